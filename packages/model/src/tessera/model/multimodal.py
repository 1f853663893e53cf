"""Multimodal front ends: image patches and log-mel audio features turned into embeddings that a
`Transformer` reads as a prefix before the text.

    patches = PatchEmbedding(patch_size=16, in_channels=3, d_model=cfg.d_model)
    lm = PrefixLM(model, patches)
    logits = lm(images, input_ids)                       # [B, n_patches + T, vocab]

    mel = log_mel_spectrogram(audio)                     # Whisper's recipe: [B, 80, frames]
    lm = PrefixLM(model, AudioEmbedding(n_mels=80, d_model=cfg.d_model))

The prefix enters through the token-embedding module's output for one forward, so the Transformer's
text path is untouched; prefix positions take the first RoPE positions, then the text follows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tessera.attn import KVContext
from tessera.model.transformer import Transformer

# ------------------------------------------------------------------------------------------- images


class PatchEmbedding(nn.Module):
    """Images `[B, C, H, W]` -> patch embeddings `[B, (H/p)(W/p), d_model]`, patches in row-major order
    (ViT's convention): a linear map of each flattened `p x p x C` patch, computed as a stride-p conv.
    Raises ValueError naming the size when H or W is not a multiple of `patch_size`, or C is wrong."""

    def __init__(self, patch_size: int, in_channels: int, d_model: int) -> None:
        super().__init__()
        self.patch_size, self.in_channels = patch_size, in_channels
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must be [B, {self.in_channels}, H, W], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size={self.patch_size}")
        return self.proj(images).flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------------------- audio


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    # Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's default, and Whisper's).
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    linear = hz / f_sp
    log = min_log_hz / f_sp + torch.log(hz.clamp(min=min_log_hz) / min_log_hz) / logstep
    return torch.where(hz >= min_log_hz, log, linear)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    linear = mel * f_sp
    log = min_log_hz * torch.exp(logstep * (mel - min_log_mel))
    return torch.where(mel >= min_log_mel, log, linear)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Triangular mel filters `[n_freqs, n_mels]` over the FFT bins `0 .. sample_rate/2`, centres evenly
    spaced on the Slaney mel scale, each filter scaled to unit area (Slaney normalisation)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_hz = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    mel_edges = torch.linspace(float(_hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
                               float(_hz_to_mel(torch.tensor(f_max, dtype=torch.float64))), n_mels + 2,
                               dtype=torch.float64)
    hz_edges = _mel_to_hz(mel_edges)
    widths = hz_edges.diff()  # [n_mels + 1]
    offsets = hz_edges[:, None] - fft_hz[None, :]  # [n_mels + 2, n_freqs]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    filters = filters * (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]
    return filters.T.to(dtype).contiguous()


def log_mel_spectrogram(audio: torch.Tensor, *, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160,
                        n_mels: int = 80) -> torch.Tensor:
    """Whisper's log-mel features of mono audio `[samples]` or `[B, samples]` (float, in [-1, 1]) ->
    `[n_mels, frames]` / `[B, n_mels, frames]` with `frames = samples // hop_length`, in the audio's
    floating dtype.

    Power spectrum of a centred, reflect-padded STFT with a periodic Hann window, Slaney mel filters,
    `log10` (floored at 1e-10), values more than 8 below each example's maximum raised to it, then
    `(x + 4) / 4`. Raises ValueError for a non-float or too-short signal.
    """
    if not audio.is_floating_point():
        raise ValueError(f"audio must be a floating tensor, got {audio.dtype}")
    single = audio.dim() == 1
    batch = audio[None] if single else audio
    if batch.dim() != 2 or batch.shape[-1] <= n_fft // 2:
        raise ValueError(f"audio must be [samples] or [B, samples] with more than {n_fft // 2} samples, "
                         f"got shape {tuple(audio.shape)}")
    window = torch.hann_window(n_fft, periodic=True, dtype=batch.dtype, device=batch.device)
    spec = torch.stft(batch, n_fft, hop_length, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec.abs().pow(2)[..., :-1]  # Whisper drops the last frame so frames = samples // hop
    filters = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, dtype=batch.dtype).to(batch.device)
    log_spec = torch.einsum("fm,bft->bmt", filters, power).clamp(min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
    return log_spec[0] if single else log_spec


class AudioEmbedding(nn.Module):
    """Log-mel features `[B, n_mels, frames]` -> embeddings `[B, ceil(frames / 2), d_model]`: Whisper's
    convolutional stem (conv k=3 -> GELU -> conv k=3 stride 2 -> GELU)."""

    def __init__(self, n_mels: int, d_model: int) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.conv1 = nn.Conv1d(n_mels, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"mel features must be [B, {self.n_mels}, frames], got shape {tuple(mel.shape)}")
        x = F.gelu(self.conv1(mel))
        return F.gelu(self.conv2(x)).transpose(1, 2)


# ------------------------------------------------------------------------------------------- prefix


def forward_with_prefix(model: Transformer, prefix: torch.Tensor, input_ids: torch.Tensor,
                        positions: torch.Tensor | None = None, kv: KVContext | None = None) -> torch.Tensor:
    """Logits `[B, P + T, vocab]` of `model` reading `prefix` `[B, P, d_model]` embeddings, then the
    tokens `input_ids` `[B, T]`. `positions` `[B, P + T]` (default `0 .. P+T-1`) and `kv` are passed to
    the model, so a cache prefilled here continues with plain `model(...)` decode steps.

    The prefix replaces the token-embedding output of the first P positions for this one call (a
    forward hook on `model.model.embed_tokens`); gradients reach `prefix`. Raises ValueError for a
    prefix whose batch or width does not fit.
    """
    if prefix.dim() != 3 or prefix.shape[2] != model.config.d_model or prefix.shape[0] != input_ids.shape[0]:
        raise ValueError(f"prefix must be [B={input_ids.shape[0]}, P, d_model={model.config.d_model}], "
                         f"got shape {tuple(prefix.shape)}")
    b, p = prefix.shape[0], prefix.shape[1]
    placeholders = torch.zeros(b, p, dtype=input_ids.dtype, device=input_ids.device)

    def splice(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return torch.cat([prefix.to(out.dtype), out[:, p:]], dim=1)

    handle = model.model.embed_tokens.register_forward_hook(splice)
    try:
        return model(torch.cat([placeholders, input_ids], dim=1), positions, kv)
    finally:
        handle.remove()


class PrefixLM(nn.Module):
    """A `Transformer` that reads a front end's embeddings (`PatchEmbedding`, `AudioEmbedding`, any module
    mapping media to `[B, P, d_model]`) as a prefix before the text."""

    def __init__(self, model: Transformer, frontend: nn.Module) -> None:
        super().__init__()
        self.model, self.frontend = model, frontend

    def forward(self, media: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv: KVContext | None = None) -> torch.Tensor:
        """Logits `[B, P + T, vocab]`; see `forward_with_prefix`."""
        return forward_with_prefix(self.model, self.frontend(media), input_ids, positions, kv)
