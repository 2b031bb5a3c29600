"""tune_main.py's flags as a user types them: list flags in either form, help for every
flag with its default shown once, and a flag for every `tune` default."""
from __future__ import annotations

import dataclasses
import re

import pytest

import tune_main
from genre_ray.config import defaults
from genre_ray.errors import UserError


def test_list_flags_take_words_commas_or_both():
    spaced = tune_main.parse(["--models", "CEL", "MLP2", "--features", "spectrogram"])
    assert tune_main.parse(["--models", "CEL,MLP2", "--features", "spectrogram,"]) == spaced
    assert tune_main.parse(["--models", "CEL,", "MLP2"]).models == spaced.models == ["CEL", "MLP2"]


def test_every_tune_default_has_its_flag():
    opts = dataclasses.asdict(tune_main.parse([]))
    for key, value in defaults("tune").items():
        if key != "env_file":  # a file read for WANDB_API_KEY, not a setting of the run
            assert key in opts and str(opts[key]) == str(value), key
    changed = tune_main.parse(["--grace-period", "3", "--reduction-factor", "4", "--n-startup-trials", "5"])
    assert (changed.grace_period, changed.reduction_factor, changed.n_startup_trials) == (3, 4, 5)


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
    assert "(default: 0)" in next(o for o in options if o.startswith("--gpus-per-trial"))


@pytest.mark.parametrize("args,says", [
    (["--num-samples", "0"], r"--num-samples must be >= 1, got 0"),
    (["--reduction-factor", "1"], r"--reduction-factor must be >= 2, got 1"),
    (["--models", "CEL,NOPE"], r"unknown model 'NOPE'"),
    (["--features", "mfcc"], r"feature"),
])
def test_a_bad_flag_is_one_error_line_and_exit_2_before_anything_is_written(tmp_path, capsys, args, says):
    """In-process, for the fast tier; tests/test_bad_inputs.py runs such cases as commands."""
    with pytest.raises(SystemExit) as stop:
        tune_main.main(["--storage-path", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "best"),
                        "--wandb", "off", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and re.fullmatch(rf"error: .*{says}.*\n", err), err
    assert not list(tmp_path.iterdir())


def test_config_replays_a_runs_settings_and_flags_beside_it_win(tmp_path):
    """A finished run's run.json given to --config gives the same spec; a YAML of fields too."""
    from genre_ray import experiment, runs

    first = tune_main.parse(["--models", "CEL,MLP2", "--features", "spectrogram", "--num-samples", "5",
                             "--grace-period", "3", "--seed", "7", "--output-dir", str(tmp_path / "best")])
    run = runs.Run("r", tmp_path / "r", experiment._spec(first), resume=False)
    runs.write_record(run, "finished")
    record = tmp_path / "r" / runs.RECORD
    assert experiment._spec(tune_main.parse(["--config", str(record)])) == experiment._spec(first)
    assert tune_main.parse(["--config", str(record), "--num-samples", "2"]).num_samples == 2
    (tmp_path / "c.yaml").write_text("models: CEL3\nmax_epochs: 4\n")
    opts = tune_main.parse(["--config", str(tmp_path / "c.yaml")])
    assert (opts.models, opts.max_epochs, opts.num_samples) == (["CEL3"], 4, defaults("tune")["num_samples"])


@pytest.mark.parametrize("text,says", [
    ("num_sample: 3\n", r"unknown setting\(s\) num_sample; settings: .*num_samples"),
    ("- CEL\n", r"is not a mapping of settings"),
    ("models: [CEL\n", r"cannot be read as YAML"),
])
def test_a_bad_config_file_is_one_clear_error(tmp_path, text, says):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError, match=says):
        tune_main.parse(["--config", str(tmp_path / "c.yaml")])
