from pathlib import Path

from irc.benchmark.results import results_path


def test_results_path_keeps_dots_inside_the_name():
    assert results_path("docs/results/decode_speed_min_saving_0.003", ".json") == \
        Path("docs/results/decode_speed_min_saving_0.003.json")
    assert results_path(Path("runs/a.b/frontier"), ".png") == Path("runs/a.b/frontier.png")


def test_results_path_drops_a_trailing_md_or_json():
    assert results_path("docs/results/decode_speed.md", ".json") == Path("docs/results/decode_speed.json")
    assert results_path("docs/results/decode_speed.json", ".md") == Path("docs/results/decode_speed.md")
