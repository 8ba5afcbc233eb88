"""The training config: YAML + `key=value` overrides resolve in order, values are coerced to
the declared field types, and every bad value is a ConfigError that names its field — raised
before a model is built or a step is trained."""

import dataclasses
import json
import re

import pytest
import yaml

from prolix.kernels import GRPOLossConfig
from prolix.trainer.config import ConfigError, TrainConfig, load_config, save_config
from prolix.trainer.train import main as train_main

# A file source keeps these tests independent of reasoning-gym (the demo's default source).
JSONL_SOURCE = "data.sources=[{kind: jsonl, path: %s, reward: exact, heldout_size: 2}]"


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"add {i} and 1", "answer": str(i + 1)}) + "\n" for i in range(8)))
    return path


def test_yaml_then_overrides_then_defaults(tmp_path, jsonl):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"optim": {"lr": 3e-6, "prompts_per_step": 8, "mini_batch_prompts": 2},
                                        "rollout": {"n": 16}}))
    cfg = load_config(cfg_file, ["optim.lr=1e-6", JSONL_SOURCE % jsonl])
    assert cfg.optim.lr == 1e-6                        # the override beats the file
    assert cfg.rollout.n == 16                         # the file beats the default
    assert cfg.optim.updates_per_rollout == 4          # 8 prompts in mini-batches of 2
    assert cfg.optim.weight_decay == TrainConfig.__dataclass_fields__["optim"].default_factory().weight_decay
    assert cfg.data.sources[0].kind == "jsonl" and cfg.data.sources[0].reward == "exact"


def test_override_strings_are_coerced_to_the_field_types(jsonl):
    cfg = load_config(None, [JSONL_SOURCE % jsonl, "optim.lr=2e-6", "optim.betas=[0.9, 0.95]",
                             "reference.reset_optimizer=false", "algorithm.loss.tis_cap=2", "eval.heldout_size=null",
                             "run.steps=7", "rollout.engine_options={kv_cache_gib: 2}", "run.name=123"])
    assert cfg.optim.lr == 2e-6 and isinstance(cfg.optim.lr, float)     # YAML 1.1 reads 2e-6 as a string
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.reference.reset_optimizer is False
    assert cfg.algorithm.loss.tis_cap == 2.0 and cfg.eval.heldout_size is None
    assert cfg.run.steps == 7 and cfg.rollout.engine_options == {"kv_cache_gib": 2}
    assert cfg.run.name == "123"                        # str fields keep the raw text


def test_choice_overrides_keep_the_raw_text(jsonl):
    """`off` is a choice here, not YAML 1.1's false."""
    cfg = load_config(None, [JSONL_SOURCE % jsonl, "reference.mode=off", "model.autocast=off"])
    assert cfg.reference.mode == "off" and cfg.model.autocast == "off"


def test_list_items_are_overridden_by_index(tmp_path, jsonl):
    cfg = load_config(None, [JSONL_SOURCE % jsonl, "data.sources.0.heldout_size=3"])
    assert cfg.data.sources[0].heldout_size == 3
    with pytest.raises(ConfigError, match=r"index 5 out of range"):
        load_config(None, [JSONL_SOURCE % jsonl, "data.sources.5.heldout_size=3"])


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1", "optim.lrr"),
    ("optimizer.lr=1", "optimizer.lr"),
])
def test_unknown_keys_list_the_valid_ones(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(field) and "valid keys" in str(e.value)


def test_unknown_yaml_section_is_an_error(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"trainer: unknown key .*valid keys of config: model, demo, data"):
        load_config(cfg_file)


def test_unknown_yaml_field_names_its_section(tmp_path, jsonl):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("rollout:\n  temprature: 1.2\n")
    with pytest.raises(ConfigError, match=r"rollout.temprature: unknown key; valid keys of rollout: engine, n, temp"):
        load_config(cfg_file, [JSONL_SOURCE % jsonl])


@pytest.mark.parametrize("overrides, message", [
    (["rollout.max_tokens=1000"], r"rollout.max_tokens: a prompt of up to rollout.max_prompt_tokens=128 plus a "
                                  r"response of 1000 tokens exceeds rollout.max_model_len=176"),
    (["optim.max_tokens_per_microbatch=100"], r"optim.max_tokens_per_microbatch: expected >= the longest sequence"),
    (["optim.mini_batch_prompts=5"], r"optim.mini_batch_prompts: expected a divisor of optim.prompts_per_step=16"),
    (["eval.k=8"], r"eval.k: expected 1 <= k <= eval.n=4, got 8"),
    (["rollout.n=1"], r"rollout.n: expected >= 2"),
    (["optim.lr=fast"], r"optim.lr: expected float, got 'fast'"),
    (["reference.mode=sometimes"], r"reference.mode: expected one of \('off', 'patience', 'every', 'both'\)"),
    (["reference.mode=every"], r"reference.every: expected >= 1 with reference.mode='every'"),
    (["algorithm.loss.clip_low=1.5"], r"algorithm.loss: clip_low must be < 1"),
    (["algorithm.overlong=truncate"], r"algorithm.overlong: expected one of"),
    (["rollout.engine=vlm"], r"rollout.engine: expected one of \('torch', 'vllm'\), got 'vlm'"),
    (["model.attn_backend=flash"], r"model.attn_backend: expected one of \('auto', 'flash_attn', "),
    (["model.kernel_backend=cuda"], r"model.kernel_backend: expected one of \('auto', 'torch', 'triton'\)"),
    (["algorithm.loss.kl_estimator=k4"], r"algorithm.loss: kl_estimator must be one of"),
])
def test_invalid_values_name_the_field(jsonl, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [JSONL_SOURCE % jsonl, *overrides])


def test_model_context_smaller_than_the_budget_is_rejected(jsonl):
    cfg = load_config(None, [JSONL_SOURCE % jsonl])
    with pytest.raises(ConfigError, match=r"rollout.max_model_len: 176 exceeds the model's context .*=128"):
        cfg.check_model_context(128)
    cfg.check_model_context(176)


def test_missing_answer_field_is_a_config_error_naming_file_row_and_field(tmp_path):
    from prolix.trainer.data import prepare_data

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    cfg = load_config(None, [JSONL_SOURCE % bad])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*bad.jsonl: row 2: missing field 'answer'"):
        prepare_data(cfg)


def test_unknown_reasoning_gym_task_suggests_the_right_name():
    pytest.importorskip("reasoning_gym")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*unknown reasoning-gym dataset name='chain_summ'.*"
                                          r"did you mean 'chain_sum'"):
        load_config(None, ["data.sources.0.name=chain_summ"])


def test_resolved_config_round_trips_through_yaml(tmp_path, jsonl):
    cfg = load_config(None, [JSONL_SOURCE % jsonl, "optim.betas=[0.9, 0.95]", "algorithm.loss.dual_clip=3"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg


def test_an_optional_section_left_at_none_takes_overrides_and_round_trips(tmp_path, jsonl):
    rc = "algorithm.loss.rollout_correction."          # None by default: the overrides start it empty
    cfg = load_config(None, [JSONL_SOURCE % jsonl, rc + "is_level=token", rc + "is_max=2", rc + "reject_threshold=0.1"])
    assert cfg.loss_config().rollout_correction.is_max == 2.0 and cfg.loss_config().corrects_rollout
    assert load_config(save_config(cfg, tmp_path / "config.yaml")) == cfg


def test_cli_rejects_a_bad_config_before_building_anything(tmp_path, jsonl, capsys):
    code = train_main([f"run.out_dir={tmp_path}", "run.name=bad", "rollout.max_tokens=4000", JSONL_SOURCE % jsonl])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"prolix train: error: rollout.max_tokens: .*exceeds rollout.max_model_len", err)
    assert not (tmp_path / "bad").exists()             # no run dir, no model, no warm start


def test_cli_rejects_a_missing_data_file_before_building_anything(tmp_path, capsys):
    code = train_main([f"run.out_dir={tmp_path}", "run.name=bad", JSONL_SOURCE % (tmp_path / "nope.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"data.sources\[0\]: .*nope.jsonl.* is not a file", err)
    assert not (tmp_path / "bad").exists()


def test_the_loss_options_are_the_kernels_config_completed_from_the_rollout(jsonl):
    cfg = load_config(None, [JSONL_SOURCE % jsonl, "rollout.temperature=1.2", "algorithm.loss.kl_coef=0.01",
                             "algorithm.loss.loss_agg=seq-mean-token-sum-norm"])
    assert isinstance(cfg.algorithm.loss, GRPOLossConfig) and cfg.loss_config() is cfg.algorithm.loss
    assert cfg.algorithm.loss == GRPOLossConfig(clip_low=0.2, clip_high=0.4, kl_coef=0.01, temperature=1.2,
                                                loss_agg="seq-mean-token-sum-norm", max_len=cfg.rollout.max_tokens)


OLD_ALGORITHM = {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 3.0, "kl_coef": 0.02, "kl_estimator": "k2",
                 "entropy_coef": 0.001, "tis_cap": 2.0, "loss_agg": "seq-mean-token-sum-norm", "loss_max_len": 99,
                 "advantage": "dr_grpo"}


def test_a_config_with_the_old_flat_loss_keys_loads_them_at_their_new_place(tmp_path, jsonl, capsys):
    """Files written before `algorithm.loss` (a run's saved config.yaml among them) keep working."""
    cfg_file = tmp_path / "old.yaml"
    cfg_file.write_text(yaml.safe_dump({"algorithm": OLD_ALGORITHM}))
    cfg = load_config(cfg_file, [JSONL_SOURCE % jsonl, "algorithm.clip_high=0.35"])      # an old override too
    want = GRPOLossConfig(clip_low=0.1, clip_high=0.35, dual_clip=3.0, kl_coef=0.02, kl_estimator="k2",
                          entropy_coef=0.001, tis_cap=2.0, loss_agg="seq-mean-token-sum-norm", max_len=99)
    assert cfg.algorithm.loss == want and cfg.algorithm.advantage == "dr_grpo"
    err = capsys.readouterr().err
    assert "algorithm.clip_low is now algorithm.loss.clip_low" in err
    assert "algorithm.loss_max_len is now algorithm.loss.max_len" in err


def test_a_loss_temperature_other_than_the_rollouts_is_refused_in_code(jsonl):
    cfg = load_config(None, [JSONL_SOURCE % jsonl])
    loss = dataclasses.replace(cfg.algorithm.loss, temperature=0.5)
    with pytest.raises(ConfigError, match=r"algorithm.loss.temperature: expected rollout.temperature \(1.0\)"):
        dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, loss=loss))


def test_off_is_a_choice_not_a_yaml_boolean(tmp_path, jsonl):
    # YAML 1.1 reads a bare `off` as False; a choice among strings takes what the user wrote.
    assert load_config(None, ["reference.mode=off"]).reference.mode == "off"
    path = tmp_path / "run.yaml"
    path.write_text("reference:\n  mode: off\n")
    assert load_config(path, []).reference.mode == "off"
    with pytest.raises(ConfigError, match=r"reference\.mode: expected one of"):
        load_config(None, ["reference.mode=of"])
