from irc.cli import main

raise SystemExit(main())
