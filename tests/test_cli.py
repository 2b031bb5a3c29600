"""tune_main.py's flags as a user types them: list flags in either form, help for every
flag with its default shown once, a flag for every run and search default, and --config."""
from __future__ import annotations

import re

import pytest
import yaml

import tune_main
from genre_ray import checks, config, runs
from genre_ray.errors import UserError
from genre_ray.storage import storage


def spec(argv: list[str]) -> dict:
    """The configuration a command line gives, as its run would save it."""
    return config.as_json(checks.resolved(tune_main.parse(argv)[0]))


def test_list_flags_take_words_commas_or_both_and_a_repeat_counts_once():
    spaced = spec(["--models", "CEL", "MLP2", "--features", "spectrogram"])
    assert spec(["--models", "CEL,MLP2", "--features", "spectrogram,"]) == spaced
    assert spec(["--models", "CEL", "MLP2", "CEL", "--features", "spectogram", "spectrogram"]) == spaced
    assert tune_main.parse(["--models", "CEL,", "MLP2"])[0].run.models == ("CEL", "MLP2")


def test_every_flag_sets_its_field_and_every_search_default_has_a_flag():
    defaults = yaml.safe_load(config.DEFAULTS_FILE.read_text())
    flagged = {flag.field for flag in config.FLAGS.values()}
    for section in ("search", "resources", "tracking"):
        assert {f"{section}.{key}" for key in defaults[section]} <= flagged, section
    assert {f"run.{key}" for key in defaults["run"]} - flagged == {"run.env_file"}  # a file, said why
    cfg, _ = tune_main.parse(["--grace-period", "3", "--reduction-factor", "4",
                              "--n-startup-trials", "5", "--split", "fault-filtered", "--seed", "7"])
    assert (cfg.search.grace_period, cfg.search.reduction_factor, cfg.search.n_startup_trials) == (3, 4, 5)
    assert (cfg.split.kind, cfg.run.seed) == ("fault-filtered", 7)


def test_every_flag_has_help_and_its_default_at_most_once(capsys):
    with pytest.raises(SystemExit):
        tune_main.parse(["--help"])
    text = capsys.readouterr().out
    options = [" ".join(o.split()) for o in re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]]
    assert len(options) >= 20
    for option in options:
        flag, help_text = re.fullmatch(r"(-[-\w, ]*?(?: [A-Z_]+(?: \[[A-Z_]+ \.\.\.\])?| \{[^}]*\})?)"
                                       r"(?: (.*))?", option).groups()
        assert help_text, f"{flag} has no help"
        assert len(re.findall(r"default", option)) <= 1, option
        assert "(default: None)" not in option and "(default: False)" not in option, option
    assert "(default: 0.0)" in next(o for o in options if o.startswith("--gpus-per-trial"))


def test_config_replays_a_runs_configuration_and_flags_beside_it_win(tmp_path):
    """A finished run's run.json given to --config gives the same spec; a YAML of sections too."""
    argv = ["--models", "CEL,MLP2", "--features", "spectrogram", "--num-samples", "5",
            "--grace-period", "3", "--seed", "7", "--output-dir", str(tmp_path / "best")]
    (tmp_path / "c.yaml").write_text("training: {weight_decay: 0.01}\n")
    first = spec([*argv, "--config", str(tmp_path / "c.yaml")])
    folder = storage(str(tmp_path)).folder("r")
    runs.write_record(runs.Run("r", first, {}, resume=False, folder=folder), "finished")
    record = tmp_path / "r" / runs.RECORD
    assert spec(["--config", str(record)]) == first
    assert spec(["--config", str(record), "--num-samples", "2"])["search"]["num_samples"] == 2
    (tmp_path / "c.yaml").write_text("run: {models: [CEL3]}\nsearch: {max_epochs: 4}\n")
    cfg, _ = tune_main.parse(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.run.models, cfg.search.max_epochs, cfg.search.num_samples) == \
        (("CEL3",), 4, config.load().search.num_samples)


@pytest.mark.parametrize("text,says", [
    ("search: {num_sample: 3}\n", r"search\.num_sample: unknown setting"),
    ("serch: {num_samples: 3}\n", r"unknown section\(s\) serch; sections: run, data"),
    ("search: {num_samples: 0}\n", r"--num-samples must be >= 1, got 0"),
    ("training: {learning_rate: fast}\n", r"training\.learning_rate: input should be a valid number"),
    ("- CEL\n", r"is not a mapping of sections"),
    ("search: [CEL\n", r"cannot be read as YAML"),
])
def test_a_bad_config_file_is_one_clear_error(tmp_path, text, says):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError, match=says):
        tune_main.parse(["--config", str(tmp_path / "c.yaml")])
