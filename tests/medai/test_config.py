from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from medai.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-3
    name: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Run:
    data_path: Path
    epochs: int = 3
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)


def test_nested_values_are_typed_and_coerced():
    run = from_dict(Run, {"data_path": "a.npz", "epochs": 5, "optim": {"lr": "1e-4"}, "tags": ["x"]})
    assert run.data_path == Path("a.npz") and run.epochs == 5
    assert run.optim.lr == pytest.approx(1e-4) and run.optim.name == "adamw"
    assert to_dict(run)["optim"] == {"lr": 1e-4, "name": "adamw"}


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data_path: a.npz\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Run, cfg)
    assert "optim.lrr" in str(err.value) and str(cfg) in str(err.value)


@pytest.mark.parametrize(
    "data,key",
    [
        ({"data_path": "a", "epochs": "three"}, "epochs"),
        ({"data_path": "a", "epochs": True}, "epochs"),
        ({"data_path": "a", "optim": {"name": "adam"}}, "optim.name"),
        ({"data_path": "a", "tags": "x"}, "tags"),
        ({"epochs": 2}, "data_path"),
    ],
)
def test_wrong_types_and_missing_keys_are_refused(data, key):
    with pytest.raises(ConfigError) as err:
        from_dict(Run, data, source="x.yaml")
    assert err.value.key == key


def test_overrides_parse_yaml_values(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data_path: a.npz\n")
    run = load_config(Run, cfg, ["epochs=7", "optim.lr=0.5", "tags=[a, b]"])
    assert (run.epochs, run.optim.lr, run.tags) == (7, 0.5, ["a", "b"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["epochs"])


def test_parse_overrides_nests_dotted_keys_and_reads_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=1e-3", "d=[4, 8]", "e=true", "f=name", "g="]) == {
        "a": {"b": 1, "c": "1e-3"}, "d": [4, 8], "e": True, "f": "name", "g": ""
    }


@pytest.mark.parametrize(
    "overrides,key",
    [(["a..b=1"], "a..b"), (["=1"], "'=1'"), (["a b=1"], "a b"), (["a=[1,"], "a"), (["a=1", "a.b=2"], "a.b")],
)
def test_malformed_overrides_name_themselves(overrides, key):
    with pytest.raises(ConfigError, match="--override") as err:
        parse_overrides(overrides)
    assert key in str(err.value)


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "absent.yaml")
    bad = tmp_path / "syntax.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML") as err:
        load_config(Run, bad)
    assert str(bad) in str(err.value)


def test_a_binary_config_file_is_a_config_error_naming_it(tmp_path):
    """Found by the hostile-input harness: a gzipped (or any non-UTF-8) file given as the config was a
    UnicodeDecodeError traceback from `medai finetune`."""
    import gzip

    path = tmp_path / "run.yaml"
    path.write_bytes(gzip.compress(b"task: mil\n"))
    with pytest.raises(ConfigError, match="not UTF-8 text") as err:
        load_config(Optim, path)
    assert str(path) in str(err.value)
