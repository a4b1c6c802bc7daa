import pytest

import tunekit
from tunekit.backends import available_backends, get_backend_class
from tunekit.backends._registry import BackendEntry, _BUILTIN


def test_unknown_backend_lists_known_and_suggests_closest():
    with pytest.raises(tunekit.BackendNotFoundError) as exc:
        get_backend_class("togther")
    assert "together" in str(exc.value) and "openai" in str(exc.value)
    assert exc.value.hint == "did you mean 'together'?"


def test_missing_extra_gives_pip_line(monkeypatch):
    monkeypatch.setitem(_BUILTIN, "together", BackendEntry("together", "x:Y", "together", ("no_such_module_xyz",)))
    with pytest.raises(tunekit.MissingDependencyError) as exc:
        get_backend_class("together")
    assert exc.value.hint == "pip install 'tunekit[together]'"
    row = {b["name"]: b for b in available_backends()}["together"]
    assert row["installed"] is False


def test_entry_point_backends_are_found(monkeypatch):
    from importlib import metadata

    ep = metadata.EntryPoint(name="acme", value="tests.fake_backend:FakeBackend", group="tunekit.backends")
    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points",
                        lambda group=None, **kw: [ep] if group == "tunekit.backends" else real(group=group, **kw))
    assert get_backend_class("acme").__name__ == "FakeBackend"
