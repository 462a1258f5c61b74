import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lis.config import Config, ConfigError, RANGES, all_keys, load_config, to_yaml

EXPERIMENTS = sorted(Path(__file__).resolve().parents[1].joinpath("experiments").glob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_design():
    cfg = load_config()
    assert cfg.data.name == "mnist1d" and cfg.prune.target_macs_reduction == 0.75
    assert cfg.policy.name == "dean" and cfg.meta.unroll == 1 and cfg.admm.interval == 50


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_loads(path):
    assert isinstance(load_config(path), Config)


def test_file_and_overrides_layer_in_order(tmp_path):
    path = write(tmp_path, "kdp: {epochs: 7, lr: 0.2}\nrun: {name: x}\n")
    cfg = load_config(path, ["kdp.epochs=3", "prune.target_macs_reduction=0.9", "teacher.checkpoint=t.pt"])
    assert (cfg.kdp.epochs, cfg.kdp.lr, cfg.run.name) == (3, 0.2, "x")
    assert cfg.prune.target_macs_reduction == 0.9 and cfg.teacher.checkpoint == "t.pt"


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["kdp.epochs=4", "policy.name=fixed"])
    path = write(tmp_path, to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "text, overrides, fragment",
    [
        ("kdp: {epochs: 1}", ["kdp.epoch=3"], "did you mean 'kdp.epochs'"),
        ("kdp: {tempreature: 2}", [], "did you mean 'kdp.temperature'"),
        ("kpd: {epochs: 2}", [], "unknown config section 'kpd'"),
        ("kdp: {epochs: 1}", ["kdp.epochs=three"], "kdp.epochs='three' has the wrong type"),
        ("kdp: {epochs: -1}", [], "kdp.epochs=-1 is out of range"),
        ("kdp: {epochs: 1}", ["admm.interval=0"], "admm.interval=0 is out of range"),
        ("kdp: {epochs: 1}", ["prune.target_macs_reduction=1.5"], "prune.target_macs_reduction=1.5"),
        ("kdp: {epochs: 1}", ["prune.min_keep_ratio=2"], "prune.min_keep_ratio=2"),
        ("kdp: {epochs: 1}", ["data.name=imagenett"], "is not one of"),
        ("kdp: {epochs: 1}", ["prune.target_macs_reduction=null"], "no pruning budget"),
        ("kdp: {epochs: [1", [], "is not valid YAML"),
        ("- just\n- a list", [], "must map sections"),
        ("kdp: {epochs: 1}", ["kdp.epochs"], "is not of the form section.key=value"),
    ],
)
def test_bad_configs_name_the_key_in_one_line(tmp_path, text, overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


NUMERIC = [key for key, _, _ in RANGES]
# keys whose range is checked against another key's value: that key set so only the range decides
CONTEXT = {"meta.truncate": ["meta.unroll=1000000"], "meta.finetune_steps": ["meta.objective=pruned_ce"]}


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(NUMERIC), value=st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6)))
def test_validation_accepts_exactly_the_documented_range(key, value):
    """Property: a numeric override loads iff its documented range test accepts it."""
    ok = dict((k, test) for k, test, _ in RANGES)[key]
    section, name = key.split(".")
    hint = typing.get_type_hints(type(getattr(Config(), section)))[name]
    if int in (hint, *typing.get_args(hint)) and isinstance(value, float):
        value = int(value)  # ints are the only type an int field (or an optional one) takes
    overrides = CONTEXT.get(key, []) + [f"{key}={value}"]
    if ok(value):
        cfg = load_config(None, overrides)
        assert getattr(getattr(cfg, section), name) == pytest.approx(value)
    else:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, overrides)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_keys_never_pass(name):
    key = f"kdp.{name}"
    if key in all_keys():
        return
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, [f"{key}=1"])


def test_every_key_is_documented_in_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in readme]
    assert not missing, f"README config reference lacks {missing}"


def test_yaml_is_plain():
    assert yaml.safe_load(to_yaml(Config()))["run"]["dir"] == "runs"
