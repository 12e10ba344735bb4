"""nodes/train_nodes.py in process: where the training node writes its token and keeps its feature cache."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from tools.comfy_root import import_comfy, import_pack

import_comfy(cpu=True)
import_pack()
import folder_paths  # noqa: E402
from audiotoken.nodes import model_folders as mf  # noqa: E402
from audiotoken.nodes.train_nodes import AudioTokenTrain, feature_cache_dir, set_aside_earlier_run  # noqa: E402
from audiotoken.audiotoken_core.training import checkpoint_paths, latest_checkpoint  # noqa: E402


@pytest.fixture
def token_folder(tmp_path, monkeypatch):
    folder = tmp_path / "audiotoken"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, mf.AUDIOTOKEN_FOLDER, ([str(folder)], {".safetensors"}))
    return folder


def test_feature_cache_is_a_model_folder_outside_temp_that_extra_paths_can_move(tmp_path, monkeypatch):
    default = os.path.join(folder_paths.models_dir, "audiotoken_cache")
    assert folder_paths.get_folder_paths(mf.FEATURE_CACHE_FOLDER) == [default]
    assert feature_cache_dir("birds") == os.path.join(default, "birds")
    temp = os.path.realpath(folder_paths.get_temp_directory())
    assert os.path.commonpath([os.path.realpath(default), temp]) != temp  # ComfyUI empties temp/ at every start
    # extra_model_paths.yaml is read before custom nodes load: its folder stays first, ours is added after it.
    monkeypatch.setitem(folder_paths.folder_names_and_paths, mf.FEATURE_CACHE_FOLDER, ([str(tmp_path)], set()))
    mf.register_model_folders()
    assert folder_paths.get_folder_paths(mf.FEATURE_CACHE_FOLDER) == [str(tmp_path), default]
    assert feature_cache_dir("birds") == str(tmp_path / "birds")


def test_training_replaces_its_own_token_but_no_other_file(token_folder, tmp_path):
    tensors = {"embedders.l.w": torch.zeros(2)}
    save_file(tensors, str(token_folder / "trained.safetensors"), metadata={"training": '{"step": 10}'})
    save_file(tensors, str(token_folder / "imported.safetensors"), metadata={"training": "{}"})
    (token_folder / "garbage.safetensors").write_bytes(b"not a token")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (token_folder / "linked.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (token_folder / "runs_checkpoints").symlink_to(tmp_path, target_is_directory=True)

    assert AudioTokenTrain.validate_inputs(name="trained") is True
    assert AudioTokenTrain.validate_inputs(name=" new_name ") is True
    assert AudioTokenTrain.validate_inputs(name=None) is True  # a linked input: checked when it runs
    for name, reason in (("imported", "not made by the training node"), ("garbage", "not made by the training node"),
                         ("linked", "symlink"), ("runs", "symlink"), (".", "not a plain file name"),
                         ("..", "not a plain file name"), ("a/b", "not a plain file name"),
                         ("bad\0name", "not a plain file name"), ("", "not a plain file name")):
        message = AudioTokenTrain.validate_inputs(name=name)
        assert isinstance(message, str) and reason in message, (name, message)


def test_a_fresh_start_sets_the_earlier_runs_checkpoints_aside(tmp_path):
    """Resume off: the new run's checkpoints never mix with an earlier run's later steps, and nothing is deleted."""
    run_dir = tmp_path / "birds_checkpoints"
    assert set_aside_earlier_run(str(run_dir)) is None  # nothing to set aside
    run_dir.mkdir()
    token_path, state_path = checkpoint_paths(run_dir, "birds", 500)
    token_path.write_bytes(b"t")
    state_path.write_bytes(b"s")
    assert latest_checkpoint(run_dir) is not None
    kept = set_aside_earlier_run(str(run_dir))
    assert kept is not None and not run_dir.exists()
    assert sorted(p.name for p in (tmp_path / os.path.basename(kept)).iterdir()) == sorted([token_path.name, state_path.name])
    assert latest_checkpoint(run_dir) is None  # a later resume starts from the new run only


def test_objective_inputs_are_optional_and_text_match_needs_no_vae(token_folder):
    from audiotoken.nodes.train_nodes import FLUX_GUIDANCE, latent_encoder
    from audiotoken.audiotoken_core.training import TrainConfig

    inputs = {i.id: i for i in AudioTokenTrain.define_schema().inputs}
    new = ("vae", "objective", "warm_start_steps", "guidance", "text_encoder_checkpointing")
    assert all(inputs[name].optional for name in new)  # saved workflows without them still load
    assert list(inputs)[-4:] == list(new[1:])  # appended after the earlier widgets, whose order is kept
    assert inputs["objective"].options == ["diffusion", "text_match"] and inputs["objective"].default == "diffusion"
    assert inputs["guidance"].default == FLUX_GUIDANCE == 3.5 and inputs["warm_start_steps"].default == 0

    class NoVAE:
        def encode_images(self, images):
            raise AssertionError("a text-match run must not encode images")

    encode, settings = latent_encoder(NoVAE(), None, None, TrainConfig(steps=3, objective="text_match"))
    assert encode(torch.rand(2, 3, 8, 8)).shape == (2, 0) and settings == {"latents": "none (text_match)"}

    common = dict(model=None, clip=None, audio_encoder=None, dataset=None, name="birds", steps=10, learning_rate=1e-5,
                  batch_size=1, grad_accum=1, seed=0, lambda_l1=0.01, lambda_cl=0.0, save_every=5, resume=True,
                  precision="fp32", gradient_checkpointing=False, cache_features=False)
    for extra in ({}, {"warm_start_steps": 4}):  # the diffusion objective (after a warm start too) needs the VAE
        with pytest.raises(ValueError, match="connect the VAE of this model, or set objective 'text_match'"):
            AudioTokenTrain.execute(**common, **extra)
    with pytest.raises(ValueError, match="warm_start_steps .* must be below steps"):
        AudioTokenTrain.execute(**common, warm_start_steps=10)
