"""Runtime modules of a routed model: routers, forecasters, routed units."""
