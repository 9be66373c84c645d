"""TrainingArguments from code, JSON, YAML and command-line flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recis_train import TrainingArguments
from recis_train.exceptions import ConfigError


def test_defaults_round_trip_through_dict():
    args = TrainingArguments()
    assert TrainingArguments.from_dict(args.to_dict()) == args


def test_from_json_and_yaml(tmp_path):
    (tmp_path / "a.json").write_text(
        json.dumps({"train_steps": 10, "grad_clip": 1, "device": "cpu"})
    )
    (tmp_path / "a.yaml").write_text("train_steps: 10\ngrad_clip: 1.0\ndevice: cpu\n")
    from_json = TrainingArguments.from_file(tmp_path / "a.json")
    from_yaml = TrainingArguments.from_file(tmp_path / "a.yaml")
    assert from_json == from_yaml
    assert from_yaml.grad_clip == 1.0
    assert isinstance(from_json.grad_clip, float)


def test_cli_flags_override_the_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("train_steps: 10\nmixed_precision: bf16\n")
    args = TrainingArguments.from_cli(
        [
            "--config",
            str(tmp_path / "c.yaml"),
            "--train-steps",
            "25",
            "--no-resume",
            "--grad-clip",
            "none",
        ]
    )
    assert (args.train_steps, args.mixed_precision, args.resume, args.grad_clip) == (
        25,
        "bf16",
        False,
        None,
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train_stepz": 3}, r"unknown training argument\(s\) \['train_stepz'\]"),
        ({"epochs": 0}, "epochs must be at least 1, got 0"),
        ({"train_steps": 0}, "train_steps must be at least 1 or None, got 0"),
        (
            {"mixed_precision": "fp8"},
            r"mixed_precision must be one of \['no', 'bf16', 'fp16'\], got 'fp8'",
        ),
        ({"grad_clip": -1.0}, "grad_clip must be positive and finite, or None, got -1.0"),
        ({"grad_clip": "inf"}, "grad_clip must be positive and finite, or None, got inf"),
        ({"device": "tpu"}, "device must be 'auto', 'cpu' or 'cuda"),
        ({"device": "cuda:x"}, r"device must be .*, got 'cuda:x'"),
        ({"device": "cudafoo"}, r"device must be .*, got 'cudafoo'"),
        ({"device": "cuda:"}, r"device must be .*, got 'cuda:'"),
        ({"seed": "abc"}, "dict: seed must be int, got 'abc'"),
        ({"resume": "maybe"}, "dict: resume must be bool, got 'maybe'"),
        ({"save_every": -2}, "save_every must be 0 or more, got -2"),
        ({"seed": 2**64}, r"seed must be in \[-2\*\*63, 2\*\*64\), got 18446744073709551616"),
        ({1: 2, "foo": 3}, r"unknown training argument\(s\) \['1', 'foo'\]"),
    ],
)
def test_bad_values_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainingArguments.from_dict(values)


def test_cli_flags_replace_a_bad_value_of_the_config_file(tmp_path):
    # The file was checked alone before the flags applied: a flag could not mend it.
    (tmp_path / "c.yaml").write_text("train_steps: 0\nmixed_precision: fp8\n")
    config = ["--config", str(tmp_path / "c.yaml")]
    args = TrainingArguments.from_cli(
        [*config, "--train-steps", "100", "--mixed-precision", "bf16"]
    )
    assert (args.train_steps, args.mixed_precision) == (100, "bf16")
    with pytest.raises(ConfigError, match=r"c\.yaml and the command line: mixed_precision must be"):
        TrainingArguments.from_cli([*config, "--train-steps", "100"])
    (tmp_path / "u.yaml").write_text("train_step: 3\n")
    with pytest.raises(ConfigError, match=r"unknown training argument\(s\) \['train_step'\]"):
        TrainingArguments.from_cli(["--config", str(tmp_path / "u.yaml"), "--train-steps", "3"])


def test_bad_values_name_their_source():
    with pytest.raises(ConfigError) as info:
        TrainingArguments.from_dict({"train_steps": 0}, source="stage 'warm'")
    assert str(info.value) == "stage 'warm': train_steps must be at least 1 or None, got 0"


def test_bad_files_are_named(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"bad\.json: invalid json"):
        TrainingArguments.from_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        TrainingArguments.from_file(tmp_path / "list.yaml")
    # Falsy documents that are not a mapping loaded as the defaults; an empty file does.
    for text, kind in (("[]", "list"), ("0", "int"), ("false", "bool")):
        (tmp_path / "falsy.yaml").write_text(text + "\n")
        with pytest.raises(ConfigError, match=rf"falsy\.yaml: expected a mapping .*got {kind}"):
            TrainingArguments.from_file(tmp_path / "falsy.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert TrainingArguments.from_file(tmp_path / "empty.yaml") == TrainingArguments()
    with pytest.raises(ConfigError, match=r"expected a \.json, \.yaml or \.yml file"):
        TrainingArguments.from_file(tmp_path / "args.toml")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": 1.5}, r"epochs must be int, got 1\.5 \(float\)"),
        ({"train_steps": "10"}, r"train_steps must be int or None, got '10' \(str\)"),
        ({"eval_steps": 2.0}, r"eval_steps must be int or None, got 2\.0 \(float\)"),
        ({"log_every": True}, r"log_every must be int, got True \(bool\)"),
        ({"output_dir": None}, r"output_dir must be str or pathlib\.Path, got None"),
        ({"mixed_precision": None}, r"mixed_precision must be str, got None"),
        ({"grad_clip": "1.0"}, r"grad_clip must be float or None, got '1\.0' \(str\)"),
        ({"resume": 1}, r"resume must be bool, got 1 \(int\)"),
        ({"grad_clip": float("nan")}, "grad_clip must be positive and finite, or None, got nan"),
        ({"output_dir": ""}, "output_dir must name a directory, got an empty string"),
    ],
)
def test_values_given_in_python_are_checked_like_loaded_ones(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainingArguments(**values)


def test_python_values_of_a_compatible_type_are_normalized(tmp_path):
    args = TrainingArguments(output_dir=tmp_path, grad_clip=1)
    assert args.output_dir == str(tmp_path)
    assert isinstance(args.grad_clip, float)
    assert args.grad_clip == 1.0
    assert TrainingArguments.from_dict(args.to_dict()) == args


def test_numpy_scalars_are_taken_as_the_python_numbers_they_hold() -> None:
    np = pytest.importorskip("numpy")
    args = TrainingArguments(
        train_steps=np.int64(10),
        epochs=np.int32(2),
        grad_clip=np.float32(1.5),
        seed=np.uint32(3),
        deterministic=np.True_,
    )
    assert args == TrainingArguments(
        train_steps=10, epochs=2, grad_clip=1.5, seed=3, deterministic=True
    )
    assert [type(v) for v in (args.train_steps, args.grad_clip, args.deterministic)] == [
        int,
        float,
        bool,
    ]
    json.dumps(args.to_dict())  # what checkpoints record
    with pytest.raises(ConfigError, match=r"train_steps must be int or None, got 10\.0"):
        TrainingArguments(train_steps=np.float64(10.0))
    with pytest.raises(ConfigError, match=r"deterministic must be bool, got 1 \(int\)"):
        TrainingArguments(deterministic=np.int64(1))

    # from_dict takes what the constructor takes.
    loaded = TrainingArguments.from_dict(
        {"train_steps": np.int64(10), "grad_clip": np.float32(1.5), "resume": np.False_}
    )
    assert (loaded.train_steps, loaded.grad_clip, loaded.resume) == (10, 1.5, False)
    assert TrainingArguments.from_dict({"output_dir": Path("out")}).output_dir == "out"


def test_a_misspelled_flag_is_refused_not_taken_as_an_abbreviation(capsys) -> None:
    with pytest.raises(SystemExit):
        TrainingArguments.from_cli(["--train-step", "3"])
    assert "unrecognized arguments: --train-step 3" in capsys.readouterr().err
