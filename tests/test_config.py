import io

import lingrad


def test_config_describes_build_and_choices():
    info = lingrad.config()
    assert info["version"] == lingrad.__version__
    assert info["isa"] == lingrad.get_isa() in info["available_isas"]
    assert "generic" in info["available_isas"]
    assert info["num_threads"] == lingrad.get_num_threads() >= 1
    assert "-ffast-math" not in info["cxx_flags"] and "-Ofast" not in info["cxx_flags"]
    buffer = io.StringIO()
    lingrad.show_config(file=buffer)
    text = buffer.getvalue()
    assert lingrad.__version__ in text and info["isa"] in text and info["compiler"] in text


def test_isa_can_be_forced(isa):
    assert lingrad.get_isa() == isa
    assert lingrad.config()["isa"] == isa
