"""Multimodal front ends against independent implementations (unfold + matmul and transformers' ViT
patch embedding for images; transformers' numpy Whisper feature extractor for log-mel audio), and the
prefix wiring against transformers' `inputs_embeds`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function
from transformers.models.vit.modeling_vit import ViTPatchEmbeddings

from tessera.attn import FlatKVCache
from tessera.model.hf import export_hf
from tessera.model.multimodal import (
    AudioEmbedding,
    PatchEmbedding,
    PrefixLM,
    forward_with_prefix,
    log_mel_spectrogram,
    mel_filterbank,
)
from tessera.model.transformer import Transformer
from tessera.specs import ModelConfig

CFG = ModelConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, init_std=0.1)


@pytest.mark.parametrize(("size", "patch", "channels"), [((32, 48), 8, 3), ((28, 28), 7, 1)])
def test_patch_embedding_matches_unfold_and_transformers_vit(size: tuple[int, int], patch: int,
                                                             channels: int) -> None:
    torch.manual_seed(0)
    embed = PatchEmbedding(patch, channels, 40)
    images = torch.randn(2, channels, *size)
    got = embed(images)
    n = (size[0] // patch) * (size[1] // patch)
    assert got.shape == (2, n, 40)
    cols = F.unfold(images, kernel_size=patch, stride=patch)  # [B, C*p*p, n], row-major patches
    expected = cols.transpose(1, 2) @ embed.proj.weight.flatten(1).T + embed.proj.bias
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    vit = ViTPatchEmbeddings(transformers.ViTConfig(image_size=list(size), patch_size=patch, num_channels=channels,
                                                    hidden_size=40))
    vit.projection.load_state_dict(embed.proj.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(got, vit(images), atol=1e-5, rtol=1e-5)


def test_patch_embedding_rejects_bad_sizes() -> None:
    embed = PatchEmbedding(8, 3, 16)
    with pytest.raises(ValueError, match="30x32 is not a multiple of patch_size=8"):
        embed(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        embed(torch.zeros(1, 1, 32, 32))


def test_mel_filterbank_matches_transformers() -> None:
    for n_fft, n_mels, sr in [(400, 80, 16000), (512, 128, 22050)]:
        ours = mel_filterbank(n_fft // 2 + 1, n_mels, sr)
        ref = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                              max_frequency=sr / 2, sampling_rate=sr, norm="slaney", mel_scale="slaney")
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12, rtol=1e-9)


def _test_audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    chirp = 0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
    return (chirp + 0.05 * rng.standard_normal(t.shape)) * (t < seconds * 0.8)  # trailing silence hits the floor


def _whisper_reference(waveform: np.ndarray, n_mels: int) -> np.ndarray:
    """Whisper's recipe (as transformers' numpy feature extractor runs it) over transformers' public numpy
    spectrogram, in float64 apart from its STFT, which it holds in complex64."""
    log_spec = spectrogram(waveform, window_function(400, "hann"), frame_length=400, hop_length=160, power=2.0,
                           mel_filters=mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels,
                                                       min_frequency=0.0, max_frequency=8000.0, sampling_rate=16000,
                                                       norm="slaney", mel_scale="slaney"),
                           log_mel="log10", dtype=np.float64)[:, :-1]
    return (np.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels: int) -> None:
    batch = np.stack([_test_audio(1.23, 0), _test_audio(1.23, 1)])
    ours64 = log_mel_spectrogram(torch.from_numpy(batch), n_mels=n_mels)
    assert ours64.dtype == torch.float64 and ours64.shape == (2, n_mels, batch.shape[1] // 160)
    reference = np.stack([_whisper_reference(w, n_mels) for w in batch])
    np.testing.assert_allclose(ours64.numpy(), reference, atol=1e-7, rtol=0)  # complex64 rounding, values ~1

    # The feature extractor returns float32: agreement to float32 rounding of values ~1.
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, hop_length=160,
                                                     n_fft=400)
    numpy_path = extractor._np_extract_fbank_features(batch, "cpu")
    np.testing.assert_allclose(ours64.numpy(), numpy_path, atol=1e-6, rtol=0)
    public = extractor(list(batch.astype(np.float32)), sampling_rate=16000, padding="longest", return_tensors="np")
    ours32 = log_mel_spectrogram(torch.from_numpy(batch).float(), n_mels=n_mels)
    assert ours32.dtype == torch.float32
    np.testing.assert_allclose(ours32.numpy(), public.input_features, atol=1e-6, rtol=0)
    torch.testing.assert_close(log_mel_spectrogram(torch.from_numpy(batch[1]), n_mels=n_mels), ours64[1])


def test_log_mel_rejects_bad_audio() -> None:
    with pytest.raises(ValueError, match="floating"):
        log_mel_spectrogram(torch.zeros(1000, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"got shape \(100,\)"):
        log_mel_spectrogram(torch.zeros(100))


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def test_prefix_matches_transformers_inputs_embeds(model: Transformer, tmp_path: Path) -> None:
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.manual_seed(1)
    prefix = torch.randn(2, 6, CFG.d_model)
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        ours = forward_with_prefix(model, prefix, ids)
        embeds = torch.cat([prefix, hf.get_input_embeddings()(ids)], dim=1)
        expected = hf(inputs_embeds=embeds).logits
        plain = model(ids)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert not model.model.embed_tokens._forward_hooks  # the text path is left as it was
    torch.testing.assert_close(model(ids), plain, atol=0, rtol=0)


def test_prefix_prefill_then_cached_decode_equals_full_forward(model: Transformer) -> None:
    torch.manual_seed(2)
    prefix = torch.randn(1, 5, CFG.d_model)
    ids = torch.randint(0, CFG.vocab_size, (1, 8))
    with torch.no_grad():
        full = forward_with_prefix(model, prefix, ids)
        cache = FlatKVCache(CFG, 1, 16)
        first = forward_with_prefix(model, prefix, ids[:, :5], positions=cache.positions(10), kv=cache)
        cache.advance(10)
        steps = []
        for j in range(5, 8):
            steps.append(model(ids[:, j:j + 1], positions=cache.positions(1), kv=cache))
            cache.advance(1)
    torch.testing.assert_close(first, full[:, :10], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 10:], atol=1e-5, rtol=0)


def test_prefix_lm_trains_its_front_ends(model: Transformer) -> None:
    """Gradients reach both front ends through the prefix; the media change the text predictions."""
    torch.manual_seed(3)
    ids = torch.randint(0, CFG.vocab_size, (2, 4))
    image_lm = PrefixLM(model, PatchEmbedding(4, 3, CFG.d_model))
    images = torch.randn(2, 3, 8, 12)
    logits = image_lm(images, ids)
    assert logits.shape == (2, 6 + 4, CFG.vocab_size)
    logits[:, -1].logsumexp(-1).sum().backward()
    assert image_lm.frontend.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(image_lm(images + 1, ids)[:, -4:], logits[:, -4:])

    audio_lm = PrefixLM(model, AudioEmbedding(n_mels=80, d_model=CFG.d_model))
    mel = log_mel_spectrogram(torch.from_numpy(_test_audio(0.25, 4)).float().expand(2, -1))
    out = audio_lm(mel, ids)
    assert out.shape == (2, 13 + 4, CFG.vocab_size)  # 25 frames -> 13 after the stride-2 conv
    out[:, -1].logsumexp(-1).sum().backward()
    assert audio_lm.frontend.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"prefix must be \[B=2, P, d_model=32\]"):
        forward_with_prefix(model, torch.zeros(2, 3, 16), ids)
