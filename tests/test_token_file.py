"""AudioToken files, the reference importer, and audio embeddings (blend, save, load)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from audiotoken_core.embedder import REFERENCE_STATE_DICT_NAMES, Embedder, EmbedderConfig
from audiotoken_core.embedding import AudioEmbedding, blend_embeddings, load_embedding, save_embedding
from audiotoken_core.io import UnsafeFileError
from audiotoken_core.token_file import (
    AudioToken,
    AudioTokenFileError,
    import_reference_embedder,
    load_audiotoken,
    save_audiotoken,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI = REPO_ROOT / "scripts" / "import_reference_token.py"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=120)
# A tiny encoder spec: 3 layers x hidden 4 -> 12 features.
SMALL_ENCODER = {"kind": "beats", "layers": [1, 2, 3], "hidden_size": 4, "sample_rate": 16000}
F_IN = 12


def embedder(out: int, seed: int, **kw) -> Embedder:
    torch.manual_seed(seed)
    model = Embedder(EmbedderConfig(input_dim=F_IN, output_dim=out, **kw))
    with torch.no_grad():
        model.fga.reduce_potentials[0].weight.copy_(torch.tensor([[[0.9], [-1.4]]]))
    return model.eval()


def small_token(**kw) -> AudioToken:
    args = dict(
        embedders={"l": embedder(8, 0), "g": embedder(10, 1, stochastic_pooling=True)},
        encoder=dict(SMALL_ENCODER),
        placeholder="<sound>",
        prompt_template="a painting of <sound>, detailed",
        training={"steps": 1234, "lr": 1.6e-4, "data": ["vggsound"]},
        description="unit-test token",
    )
    args.update(kw)
    return AudioToken(**args)


def rewrite(src: Path, dst: Path, *, tensors=None, metadata=None) -> Path:
    """Copy a safetensors file, editing tensors and/or metadata."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    if tensors is not None:
        data = tensors(data)
    if metadata is not None:
        meta = metadata(meta)
    save_file(data, str(dst), metadata=meta)
    return dst


# ============================================================================ AudioToken


def test_token_properties_and_validation():
    token = small_token()
    assert token.widths == {"l": 8, "g": 10}
    assert token.feature_dim == 12 and token.encoder["feature_dim"] == 12
    with pytest.raises(ValueError, match="width 12 .* feature_dim 2304"):
        AudioToken(embedders={"l": embedder(8, 0)})  # default encoder: BEATs 3 x 768
    with pytest.raises(ValueError, match="does not contain the placeholder"):
        small_token(prompt_template="a photo of <audio>")
    with pytest.raises(ValueError, match="disagrees"):
        small_token(encoder={**SMALL_ENCODER, "feature_dim": 13})


def test_token_is_a_module_whose_state_dict_is_the_file_layout(tmp_path):
    token = small_token()
    assert isinstance(token, torch.nn.Module) and isinstance(token.embedders, torch.nn.ModuleDict)
    assert list(token.state_dict()) == [f"embedders.{k}.{n}" for k in ("l", "g") for n in REFERENCE_STATE_DICT_NAMES]
    assert {id(p) for p in token.parameters()} == {id(p) for e in token.embedders.values() for p in e.parameters()}
    path = tmp_path / "tok.safetensors"
    save_audiotoken(path, token)
    stored = load_file(str(path))
    assert stored.keys() == token.state_dict().keys()
    assert all(torch.equal(stored[n], t) for n, t in token.state_dict().items())
    assert token.train().embedders["l"].training and not token.eval().embedders["g"].training
    assert token.training_info == {"steps": 1234, "lr": 1.6e-4, "data": ["vggsound"]}
    with pytest.raises(TypeError, match="training_info"):
        token.training = {"step": 3}  # the train-mode flag of nn.Module is not the metadata


def test_forward_is_differentiable_and_embed_is_inference():
    token = small_token().train()
    token.set_stochastic_pooling(False)
    feats = torch.randn(2, 7, F_IN)
    out = token(feats)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"l": (2, 8), "g": (2, 10)}
    (out["l"].sum() + out["g"].sum()).backward()
    assert all(p.grad is not None for p in token.parameters())
    token.eval()
    emb = token.embed(feats)
    assert not emb.vectors["l"].requires_grad
    assert torch.equal(emb.vectors["l"], token(feats)["l"].detach())


def test_file_written_in_format_version_1_loads_unchanged(tmp_path):
    """A file laid out as format_version 1 was written (tensors and metadata spelled out here) loads
    with its weights, metadata and outputs intact."""
    torch.manual_seed(11)
    weights = {n: torch.randn(t.shape) for n, t in Embedder(EmbedderConfig(input_dim=F_IN, output_dim=8)).state_dict().items()}
    reference = Embedder(EmbedderConfig(input_dim=F_IN, output_dim=8))
    reference.load_state_dict(weights)
    path = tmp_path / "v1.safetensors"
    save_file({f"embedders.l.{n}": t for n, t in weights.items()}, str(path), metadata={
        "format": "audiotoken", "format_version": "1",
        "encoder": json.dumps({**SMALL_ENCODER, "feature_dim": 12}),
        "embedders": json.dumps({"l": {"input_dim": 12, "output_dim": 8, "stochastic_pooling": False,
                                       "pooling_dropout": 0.5}}),
        "placeholder": "<audio>", "prompt_template": "a photo of <audio>",
        "training": json.dumps({"step": 7}), "description": "older file"})
    token = load_audiotoken(path)
    assert token.training_info == {"step": 7} and token.description == "older file"
    assert token.encoder == {**SMALL_ENCODER, "feature_dim": 12} and not token.training
    feats = torch.randn(2, 5, F_IN)
    with torch.no_grad():
        assert torch.equal(token.embed(feats).vectors["l"], reference.eval()(feats))


def test_embed_runs_every_embedder():
    token = small_token()
    token.set_stochastic_pooling(False)
    feats = torch.randn(2, 7, F_IN)
    emb = token.embed(feats, source="dog.wav")
    assert isinstance(emb, AudioEmbedding) and emb.source == "dog.wav"
    assert emb.widths == {"l": 8, "g": 10} and emb.batch_size == 2
    assert torch.equal(emb.vectors["l"], token.embedders["l"](feats))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 3:] = True
    masked = token.embed(feats, padding_mask=mask)
    torch.testing.assert_close(masked.vectors["g"][1], token.embedders["g"](feats[1:, :3])[0])
    token.to(torch.float64)
    assert next(token.parameters()).dtype == torch.float64
    assert token.embed(feats).vectors["l"].dtype == torch.float32


def test_stochastic_toggle_on_token():
    token = small_token()
    feats = torch.randn(1, 9, F_IN)
    token.set_stochastic_pooling(True)
    a, b = token.embed(feats), token.embed(feats)
    assert not torch.equal(a.vectors["l"], b.vectors["l"])
    token.set_stochastic_pooling(False)
    a, b = token.embed(feats), token.embed(feats)
    assert torch.equal(a.vectors["l"], b.vectors["l"])


# ============================================================================ save / load


def test_save_load_round_trip(tmp_path):
    token = small_token()
    path = tmp_path / "tok.safetensors"
    save_audiotoken(path, token)
    loaded = load_audiotoken(path)
    assert loaded.widths == token.widths
    assert loaded.encoder == token.encoder
    assert loaded.placeholder == "<sound>"
    assert loaded.prompt_template == "a painting of <sound>, detailed"
    assert loaded.training_info == {"steps": 1234, "lr": 1.6e-4, "data": ["vggsound"]}
    assert loaded.description == "unit-test token"
    assert loaded.embedders["g"].stochastic_pooling and not loaded.embedders["l"].stochastic_pooling
    assert not any(e.training for e in loaded.embedders.values())
    for key in token.embedders:
        assert token.embedders[key].config == loaded.embedders[key].config
        for name, tensor in token.embedders[key].state_dict().items():
            assert torch.equal(tensor, loaded.embedders[key].state_dict()[name])
    token.set_stochastic_pooling(False)
    loaded.set_stochastic_pooling(False)
    feats = torch.randn(3, 5, F_IN)
    a, b = token.embed(feats), loaded.embed(feats)
    for key in ("l", "g"):
        assert torch.equal(a.vectors[key], b.vectors[key])
    # The override argument wins over the file.
    assert load_audiotoken(path, stochastic_pooling=False).embedders["g"].stochastic_pooling is False


def test_file_layout_and_metadata(tmp_path):
    path = tmp_path / "tok.safetensors"
    save_audiotoken(path, small_token())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert names == {f"embedders.{k}.{n}" for k in ("l", "g") for n in REFERENCE_STATE_DICT_NAMES}
    assert meta["format"] == "audiotoken" and meta["format_version"] == "1"
    assert json.loads(meta["encoder"]) == {**SMALL_ENCODER, "feature_dim": 12}
    assert json.loads(meta["embedders"]) == {
        "l": {"input_dim": 12, "output_dim": 8, "stochastic_pooling": False, "pooling_dropout": 0.5},
        "g": {"input_dim": 12, "output_dim": 10, "stochastic_pooling": True, "pooling_dropout": 0.5},
    }
    assert meta["placeholder"] == "<sound>"
    assert json.loads(meta["training"])["steps"] == 1234
    assert os.listdir(tmp_path) == ["tok.safetensors"]  # no temporary file left


def test_full_size_round_trip(tmp_path):
    torch.manual_seed(0)
    token = AudioToken(embedders={"l": Embedder().eval()})
    path = tmp_path / "ref.safetensors"
    save_audiotoken(path, token)
    loaded = load_audiotoken(path)
    assert sum(p.numel() for p in loaded.embedders["l"].parameters()) == 8_853_507
    feats = torch.randn(1, 16, 2304)
    assert torch.equal(token.embed(feats).vectors["l"], loaded.embed(feats).vectors["l"])


def test_load_missing_and_not_safetensors(tmp_path):
    with pytest.raises(AudioTokenFileError, match="not found"):
        load_audiotoken(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is plain text, definitely not safetensors")
    with pytest.raises(AudioTokenFileError, match="not a safetensors file"):
        load_audiotoken(junk)
    pickled = tmp_path / "embedder_learned_embeds.bin"
    torch.save(embedder(8, 0).state_dict(), pickled)
    with pytest.raises(AudioTokenFileError, match="not a safetensors file.*torch pickle.*Import Reference"):
        load_audiotoken(pickled)


def test_safetensors_header_starting_with_pickle_byte_loads(tmp_path):
    # A header length whose low byte is 0x80 must not be mistaken for a pickle.
    path = tmp_path / "tok.safetensors"
    for n in range(300):
        save_audiotoken(path, small_token(description="x" * n))
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80, "no description length gave a header length with low byte 0x80"
    assert load_audiotoken(path).description.startswith("x")


@pytest.mark.parametrize(
    "names, kind",
    [
        (["encoder.layers.0.self_attn.relative_attention_bias.weight", "patch_embedding.weight"], "BEATs"),
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"], "Stable Diffusion"),
        (["lora_unet_down_blocks_0_attentions_0.lora_up.weight"], "LoRA"),
        (list(REFERENCE_STATE_DICT_NAMES), "Import Reference"),
    ],
)
def test_load_other_checkpoint_kinds(tmp_path, names, kind):
    path = tmp_path / "other.safetensors"
    save_file({n: torch.zeros(1) for n in names}, str(path))
    with pytest.raises(AudioTokenFileError) as info:
        load_audiotoken(path)
    text = str(info.value)
    assert "expected metadata format='audiotoken', found None" in text
    assert kind in text and "models/audiotoken" in text


def test_load_wrong_format_metadata(tmp_path):
    good = tmp_path / "tok.safetensors"
    save_audiotoken(good, small_token())
    bad = rewrite(good, tmp_path / "b.safetensors", metadata=lambda m: {**m, "format": "lora"})
    with pytest.raises(AudioTokenFileError, match="found 'lora'"):
        load_audiotoken(bad)
    v2 = rewrite(good, tmp_path / "v2.safetensors", metadata=lambda m: {**m, "format_version": "2"})
    with pytest.raises(AudioTokenFileError, match="format_version '2'"):
        load_audiotoken(v2)
    js = rewrite(good, tmp_path / "js.safetensors", metadata=lambda m: {**m, "encoder": "{oops"})
    with pytest.raises(AudioTokenFileError, match="'encoder' is missing or not valid JSON"):
        load_audiotoken(js)
    empty = rewrite(good, tmp_path / "em.safetensors", metadata=lambda m: {**m, "embedders": "{}"})
    with pytest.raises(AudioTokenFileError, match="em.safetensors: metadata 'embedders' must be a non-empty JSON object"):
        load_audiotoken(empty)
    typo = rewrite(good, tmp_path / "ty.safetensors", metadata=lambda m: {**m, "embedders": '{"l": {"width": 8}}'})
    with pytest.raises(AudioTokenFileError, match=r"ty.safetensors: unknown EmbedderConfig field\(s\) \['width'\]"):
        load_audiotoken(typo)


def test_load_missing_unexpected_and_wrong_shapes(tmp_path):
    good = tmp_path / "tok.safetensors"
    save_audiotoken(good, small_token())

    def drop(d):
        d.pop("embedders.l.fc1.bias")
        return d

    def extra(d):
        d["embedders.l.fga.pp_models.0.margin_X.weight"] = torch.zeros(1, 1, 1)
        return d

    def reshape(d):
        d["embedders.g.fc2.weight"] = torch.zeros(11, 12)
        return d

    with pytest.raises(AudioTokenFileError, match=r"missing 1 tensor\(s\): 'embedders.l.fc1.bias'"):
        load_audiotoken(rewrite(good, tmp_path / "a.safetensors", tensors=drop))
    with pytest.raises(AudioTokenFileError, match=r"unexpected 1 tensor\(s\): 'embedders.l.fga.pp_models.0.margin_X.weight'"):
        load_audiotoken(rewrite(good, tmp_path / "b.safetensors", tensors=extra))
    with pytest.raises(AudioTokenFileError, match=r"embedders.g.fc2.weight: expected shape \[10, 12\], found \[11, 12\]"):
        load_audiotoken(rewrite(good, tmp_path / "c.safetensors", tensors=reshape))

    def nan(d):
        d["embedders.l.fc2.bias"][0] = float("nan")
        return d

    with pytest.raises(AudioTokenFileError, match="NaN"):
        load_audiotoken(rewrite(good, tmp_path / "d.safetensors", tensors=nan))


def test_load_encoder_feature_dim_mismatch(tmp_path):
    good = tmp_path / "tok.safetensors"
    save_audiotoken(good, small_token())
    other = {"kind": "beats", "layers": [4, 8, 12], "hidden_size": 768}
    bad = rewrite(good, tmp_path / "e.safetensors", metadata=lambda m: {**m, "encoder": json.dumps(other)})
    with pytest.raises(AudioTokenFileError, match="width 12 but the encoder 'beats'.*feature_dim 2304"):
        load_audiotoken(bad)


# ============================================================================ reference import


def reference_state(out: int = 8, seed: int = 5) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in embedder(out, seed).state_dict().items()}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd},
        lambda sd: {"embedder": {"model": sd}, "step": 3000, "note": "x"},
        lambda sd: {"module." + k: v for k, v in sd.items()},
    ],
    ids=["flat", "state_dict", "nested", "module-prefix"],
)
def test_import_reference_variants(tmp_path, wrap):
    sd = reference_state()
    path = tmp_path / "embedder_learned_embeds.bin"
    torch.save(wrap(sd), path)
    token = import_reference_embedder(
        path, encoder=SMALL_ENCODER, placeholder="<s>", prompt_template="a photo of <s>", key="l"
    )
    assert token.widths == {"l": 8} and token.placeholder == "<s>"
    assert token.training_info["imported_from"] == "embedder_learned_embeds.bin"
    ref = embedder(8, 5)
    feats = torch.randn(2, 6, F_IN)
    assert torch.equal(token.embed(feats).vectors["l"], ref(feats))


def test_import_reference_full_size_and_convert(tmp_path):
    torch.manual_seed(1)
    ref = Embedder().eval()
    src = tmp_path / "embedder_learned_embeds.bin"
    torch.save(ref.state_dict(), src)
    token = import_reference_embedder(src)
    assert token.widths == {"l": 768} and token.feature_dim == 2304
    assert token.encoder == {"kind": "beats", "layers": [4, 8, 12], "hidden_size": 768,
                             "sample_rate": 16000, "feature_dim": 2304}
    assert token.placeholder == "<audio>" and token.prompt_template == "a photo of <audio>"
    out = tmp_path / "audiotoken_sd14.safetensors"
    assert cli(str(src), str(out)).returncode == 0
    refused = cli(str(src), str(out))
    assert refused.returncode == 1 and "--force" in refused.stderr  # refuses to overwrite
    loaded = load_audiotoken(out)
    feats = torch.randn(1, 10, 2304)
    with torch.no_grad():
        expected = ref(feats)
    assert torch.equal(loaded.embed(feats).vectors["l"], expected)
    assert torch.equal(token.embed(feats).vectors["l"], expected)


def test_import_records_the_git_object_id_and_whether_it_is_the_authors_release(tmp_path, monkeypatch):
    """The authors publish no checksum: the file's git object id (git's own `hash-object`, run here as
    the independent computation) tells their release from a .bin of your own training."""
    import shutil

    import audiotoken_core.token_file as token_file

    git = shutil.which("git")
    assert git, "git is needed to check git_blob_id against `git hash-object`"
    path = tmp_path / "embedder_learned_embeds.bin"
    torch.save(reference_state(), path)
    expected = subprocess.run([git, "hash-object", str(path)], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert len(expected) == 40
    token = import_reference_embedder(path, encoder=SMALL_ENCODER, key="l")
    assert token.training_info["git_blob_id"] == expected and token.training_info["authors_release"] is False
    monkeypatch.setattr(token_file, "AUTHORS_RELEASE_GIT_BLOB_ID", expected)
    assert import_reference_embedder(path, encoder=SMALL_ENCODER, key="l").training_info["authors_release"] is True
    assert token_file.git_blob_id(tmp_path / "embedder_learned_embeds.bin") == expected
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert token_file.git_blob_id(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob


def test_import_reference_width_1024_gets_key_h(tmp_path):
    path = tmp_path / "sd2.bin"
    torch.save(reference_state(out=1024 // 64), path)  # 16 wide: no known key
    with pytest.raises(AudioTokenFileError, match="output width 16 matches no known text encoder"):
        import_reference_embedder(path, encoder=SMALL_ENCODER)
    torch.manual_seed(0)
    big = Embedder(EmbedderConfig(input_dim=F_IN, output_dim=1024))
    torch.save(big.state_dict(), path)
    assert import_reference_embedder(path, encoder=SMALL_ENCODER).widths == {"h": 1024}


class Payload:
    """Unpickling this must never run: weights_only refuses arbitrary classes."""

    ran = []

    def __setstate__(self, state):
        Payload.ran.append(state)


@pytest.mark.parametrize("extra", [Payload(), os.system], ids=["custom-class", "os.system"])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_import_refuses_pickles_that_carry_code(tmp_path, extra, zipped):
    path = tmp_path / "evil.bin"
    torch.save({"state_dict": reference_state(), "extra": extra}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafeFileError) as info:
        import_reference_embedder(path, encoder=SMALL_ENCODER)
    text = str(info.value)
    assert "evil.bin was refused because it contains code" in text
    assert ("Payload" if extra is not os.system else "system") in text
    assert ".safetensors" in text and "weights_only" not in text and "GLOBAL" not in text
    assert Payload.ran == []
    bare = tmp_path / "bare.pkl"  # a plain pickle naming a function, not written by torch.save
    bare.write_bytes(pickle.dumps({"run": os.system}, protocol=2))
    with pytest.raises(UnsafeFileError, match="bare.pkl was refused because it contains code"):
        import_reference_embedder(bare)


def test_import_errors_name_the_problem(tmp_path):
    path = tmp_path / "x.bin"
    with pytest.raises(AudioTokenFileError, match="not found"):
        import_reference_embedder(path)
    sd = reference_state()
    sd.pop("fga.reduce_potentials.0.weight")
    sd["fga.pp_models.0.normalize_S.weight"] = torch.zeros(3)
    torch.save(sd, path)
    with pytest.raises(AudioTokenFileError) as info:
        import_reference_embedder(path, encoder=SMALL_ENCODER)
    assert "missing 1 tensor(s): 'fga.reduce_potentials.0.weight'" in str(info.value)
    assert "unexpected 1 tensor(s): 'fga.pp_models.0.normalize_S.weight'" in str(info.value)
    sd = reference_state()
    sd["fga.un_models.0.embed.weight"] = torch.zeros(8, 8)
    torch.save(sd, path)
    with pytest.raises(AudioTokenFileError, match=r"fga.un_models.0.embed.weight: expected shape \[8, 8, 1\], found \[8, 8\]"):
        import_reference_embedder(path, encoder=SMALL_ENCODER)
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(AudioTokenFileError, match=r"expected one reference Embedder.*found none among 1 tensor.*'weight'"):
        import_reference_embedder(path)
    torch.save(reference_state(), path)
    with pytest.raises(AudioTokenFileError, match="width 12 but the encoder 'beats' gives feature_dim 2304"):
        import_reference_embedder(path, key="l")  # default BEATs spec expects 2304
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="x.bin is not a readable torch file"):
        import_reference_embedder(path)


def test_cli_script(tmp_path):
    src = tmp_path / "embedder_learned_embeds.bin"
    torch.save(reference_state(), src)
    out = tmp_path / "out.safetensors"
    res = cli(str(src), str(out), "--encoder", json.dumps(SMALL_ENCODER), "--key", "l")
    assert res.returncode == 0, res.stderr
    assert load_audiotoken(out).widths == {"l": 8}
    info = cli("--info", str(out))
    assert info.returncode == 0 and json.loads(info.stdout)["widths"] == {"l": 8}
    missing = cli(str(tmp_path / "missing.bin"), str(tmp_path / "o2.safetensors"))
    assert missing.returncode == 1 and "not found" in missing.stderr


# ============================================================================ AudioEmbedding


def emb(vectors: dict, source: str = "") -> AudioEmbedding:
    return AudioEmbedding(vectors=vectors, source=source)


def test_audio_embedding_holds_float32_cpu_vectors():
    e = emb({"l": torch.ones(2, 4, dtype=torch.float64, requires_grad=True), "g": torch.zeros(2, 6)}, "a.wav")
    assert e.batch_size == 2 and e.widths == {"l": 4, "g": 6}
    assert e.vectors["l"].dtype == torch.float32 and e.vectors["l"].device.type == "cpu"
    assert not e.vectors["l"].requires_grad


@pytest.mark.parametrize("vectors, problem", [
    ({"l": torch.ones(4)}, r"vector 'l' is not a finite float \[B, D\] tensor \(shape \[4\]\)"),
    ({"l": torch.tensor([[1.0, float("nan")]])}, "vector 'l' is not a finite float"),
    ({"l": torch.ones(2, 4), "g": torch.ones(3, 4)}, "one batch size, found {'g': 3, 'l': 2}"),
    ({}, "one batch size, found {}"),
])
def test_load_embedding_names_what_is_wrong_with_a_file(tmp_path, vectors, problem):
    path = tmp_path / "bad.safetensors"
    save_file({f"vectors.{k}": v for k, v in vectors.items()}, str(path), metadata={"format": "audiotoken-embedding"})
    with pytest.raises(ValueError, match="bad.safetensors is not an audio embedding file: .*" + problem):
        load_embedding(path)


def test_blend_math_and_broadcast():
    a = emb({"l": torch.tensor([[1.0, 0.0]]), "g": torch.tensor([[2.0, 2.0, 2.0]])}, "a")
    b = emb({"l": torch.tensor([[0.0, 1.0], [4.0, 4.0]]), "g": torch.tensor([[0.0] * 3, [1.0] * 3])}, "b")
    out = blend_embeddings([a, b], [1.0, 3.0])
    assert out.batch_size == 2
    torch.testing.assert_close(out.vectors["l"], torch.tensor([[0.25, 0.75], [3.25, 3.0]]))
    torch.testing.assert_close(out.vectors["g"], torch.tensor([[0.5] * 3, [1.25] * 3]))
    raw = blend_embeddings([a, b], [1.0, 3.0], normalize_weights=False)
    torch.testing.assert_close(raw.vectors["l"], torch.tensor([[1.0, 3.0], [13.0, 12.0]]))
    diff = blend_embeddings([a, a], [1.0, -1.0], normalize_weights=False)
    assert float(diff.vectors["l"].abs().max()) == 0.0
    assert "a" in out.source and "b" in out.source
    single = blend_embeddings([b], [5.0])
    assert torch.equal(single.vectors["l"], b.vectors["l"])


def test_blend_errors():
    a = emb({"l": torch.ones(1, 4)}, "dog.wav")
    with pytest.raises(ValueError, match="sum to 0"):
        blend_embeddings([a, a], [1.0, -1.0])
    with pytest.raises(ValueError, match=r"'dog.wav'.*\{'l': 4\}.*'rain.wav'.*\{'l': 4, 'g': 2\}"):
        blend_embeddings([a, emb({"l": torch.ones(1, 4), "g": torch.ones(1, 2)}, "rain.wav")], [1, 1])
    with pytest.raises(ValueError, match=r"\{'l': 4\} but embedding 1 has \{'l': 5\}"):
        blend_embeddings([a, emb({"l": torch.ones(1, 5)})], [1, 1])
    with pytest.raises(ValueError, match=r"batch sizes \[2, 3\]"):
        blend_embeddings([emb({"l": torch.ones(2, 4)}), emb({"l": torch.ones(3, 4)})], [1, 1])


def test_embedding_save_load(tmp_path):
    e = emb({"l": torch.randn(3, 8), "g": torch.randn(3, 10)}, "blend(dog + rain)")
    path = tmp_path / "e.safetensors"
    save_embedding(path, e, metadata={"note": "hi", "seconds": 10})
    back = load_embedding(path)
    assert back.source == "blend(dog + rain)" and back.widths == e.widths
    for k in e.vectors:
        assert torch.equal(back.vectors[k], e.vectors[k])
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"vectors.l", "vectors.g"}
    assert meta["format"] == "audiotoken-embedding" and meta["note"] == "hi" and meta["seconds"] == "10"
    tok = tmp_path / "tok.safetensors"
    save_audiotoken(tok, small_token())
    with pytest.raises(ValueError, match="expected metadata format='audiotoken-embedding', found 'audiotoken'"):
        load_embedding(tok)
    with pytest.raises(ValueError, match="not found"):
        load_embedding(tmp_path / "missing.safetensors")
    # And the AudioToken loader recognises an embedding file.
    with pytest.raises(AudioTokenFileError, match="audio embedding"):
        load_audiotoken(path)
    assert load_file(str(path))["vectors.l"].shape == (3, 8)
