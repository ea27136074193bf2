"""The peer of `bench step`: the same distillation step written as a user of torch + transformers
would write it. torch and transformers are imported here only, and only when a peer is timed:
the package never needs them.

    teacher   Qwen2ForCausalLM (LlamaForCausalLM for llama teachers) from the teacher's config,
              random weights, bfloat16, eval(), forward under torch.inference_mode()
    student   the same class at the student's shape, float32 master weights, forward under
              torch.autocast(bfloat16), SDPA attention
    loss      forward KL(p_teacher || q_student) over the full vocabulary, mean over tokens
    update    clip_grad_norm_(1.0), torch.optim.AdamW(fused=True on CUDA)

Random weights and ids: the peer exists for time and memory, not for its numbers.
"""
from __future__ import annotations

from ..config import ModelConfig


def unavailable() -> str | None:
    """Why no peer can run here (None: torch and transformers import)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception as exc:                       # ImportError, or a broken install
        return f"torch + transformers do not import ({type(exc).__name__}: {exc})"
    return None


def unsupported(cfg: ModelConfig) -> str | None:
    """Why the peer cannot build a model of ``cfg`` (None: it can)."""
    if cfg.architecture not in ("qwen2", "llama"):
        return f"no peer for the {cfg.architecture} family (qwen2 and llama only)"
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        return f"the peer's {cfg.architecture} needs head_dim x heads = d_model ({cfg.head_dim} x {cfg.n_heads} != {cfg.d_model})"
    return None


def hf_config(cfg: ModelConfig):
    """transformers config of the same shape as ``cfg`` (SDPA attention)."""
    import transformers

    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base, tie_word_embeddings=cfg.tied_output,
              max_position_embeddings=max(cfg.context_length, 32768))
    kind = transformers.Qwen2Config if cfg.architecture == "qwen2" else transformers.LlamaConfig
    config = kind(**kw)
    config._attn_implementation = "sdpa"
    return config


def build_model(cfg: ModelConfig, dtype, device):
    import torch
    import transformers

    kind = transformers.Qwen2ForCausalLM if cfg.architecture == "qwen2" else transformers.LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = kind(hf_config(cfg))
    return model.to(dtype=dtype)


class Peer:
    """A bf16 teacher; ``student(cfg)`` adds a student with its optimizer; ``step(ids)`` one step."""

    def __init__(self, teacher_cfg: ModelConfig):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = build_model(teacher_cfg, torch.bfloat16, self.device).eval()
        self.student_model = self.opt = None

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def resident_bytes(self, model) -> int:
        return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

    def set_student(self, cfg: ModelConfig) -> None:
        torch = self.torch
        self.student_model = self.opt = None                 # the previous student goes first
        self.student_model = build_model(cfg, torch.float32, self.device).train()
        self.opt = torch.optim.AdamW(self.student_model.parameters(), lr=1e-4, weight_decay=0.01,
                                     fused=True if self.on_gpu else None)

    def ids(self, ids_host):
        return self.torch.as_tensor(ids_host, dtype=self.torch.long, device=self.device)

    def teacher_forward(self, ids):
        with self.torch.inference_mode():
            return self.teacher(input_ids=ids).logits             # bf16 [B, T, V]

    def step(self, ids) -> float:
        torch = self.torch
        F = torch.nn.functional
        t = self.teacher_forward(ids)
        with torch.autocast(self.device, dtype=torch.bfloat16):
            s = self.student_model(input_ids=ids).logits           # bf16 [B, T, V]
        V = s.shape[-1]
        log_p = F.log_softmax(t.float().reshape(-1, V), dim=-1)   # a normal tensor: made outside inference mode
        log_q = F.log_softmax(s.float().reshape(-1, V), dim=-1)
        loss = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")   # sum p (log p - log q) / tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student_model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # -- clocks and memory (the bench calls these) ----------------------------------------------
    def mark(self):
        import time

        if not self.on_gpu:
            return time.perf_counter()
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, a, b) -> float:
        if not self.on_gpu:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1e3

    def reset_peak(self) -> None:
        if self.on_gpu:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.on_gpu else None

    def release(self) -> None:
        """Drop the student (and its optimizer state) and hand cached blocks back."""
        self.student_model = self.opt = None
        if self.on_gpu:
            self.torch.cuda.empty_cache()

    @staticmethod
    def is_out_of_memory(exc) -> bool:
        return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
