from irc.data.wikitext import clean_wikitext, remove_balanced, remove_links_with_prefix


def test_nested_templates_and_tables():
    assert remove_balanced("a {{x|{{y}}|z}} b", "{{", "}}") == "a  b"
    assert remove_balanced("a {{unclosed {{x}} tail", "{{", "}}") == "a "
    text = "Intro text goes here now.\n{| class=t\n|-\n| {{flag|X}} || 1\n|}\nAfter the table it goes on."
    assert clean_wikitext(text) == "Intro text goes here now.\n\nAfter the table it goes on."


def test_links_refs_files_and_quotes():
    text = (
        "'''Paris''' is the [[capital city|capital]] of [[France]].<ref name=a>Cite, p. 3</ref> "
        "It lies on the [[Seine]]<ref name=b/> river. "
        "[[File:Paris.jpg|thumb|The [[Eiffel Tower]] at night]]"
        "See [http://example.org the site] for more &amp; more.[[fr:Paris]]"
    )
    assert clean_wikitext(text) == (
        "Paris is the capital of France. It lies on the Seine river. "
        "See the site for more & more."
    )
    assert remove_links_with_prefix("a [[Category:X]] b [[Image:y.png|c [[z]] d]] e") == "a  b  e"


def test_headings_lists_and_tail_sections():
    text = (
        "First paragraph has enough words.\n\n== History ==\nSecond paragraph has enough words.\n"
        "* a list item that is dropped\n# numbered item dropped too\n"
        "Third paragraph keeps its words.\n== See also ==\nNothing after this heading survives here."
    )
    assert clean_wikitext(text) == (
        "First paragraph has enough words.\n\nSecond paragraph has enough words.\n\n"
        "Third paragraph keeps its words."
    )


def test_comments_math_and_short_fragments():
    text = "Energy is <!-- hidden -->conserved in <math>E=mc^2</math> closed systems always.\n\nok\n"
    assert clean_wikitext(text) == "Energy is conserved in closed systems always."
    assert clean_wikitext("(  ) x") == ""
