"""Student shapes as users write them, and parameter counts.

Two spellings, both parsed to one spec dict, then turned into a ModelConfig that keeps the
teacher's family (norms, rope, activation, biases) and vocabulary (``student_config``):

  ``--student`` (plan, reproduce-memory; ``parse_student_spec``): ``layers=0,9,18,27`` copies those
      teacher blocks; ``n_layers=4[,d_model=...]`` the teacher's widths with these replaced;
      ``params=0.5e9`` a qwen2-like student of about that size; or a preset name (below).
  ``--student-shape`` (distill, plan, reproduce-memory, bench step; ``parse_student_shape``): a
      fresh, randomly initialised student: a preset and/or ``key=value`` widths, where
      ``layers=N`` is a block *count*:
      ``layers=24,d_model=896,heads=14,kv_heads=2,head_dim=64,d_ff=4864``, ``qwen2-0.5b``,
      ``qwen2-0.5b,layers=12`` (a preset with one width replaced).
"""
from __future__ import annotations

import math

from ..config import ModelConfig
from ..errors import Q4KError

STUDENT_KEYS = ("layers", "n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim", "tied", "params")
WIDTHS = ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim")
WIDTH_LIMITS = {"n_layers": 4096, "d_model": 1 << 17, "d_ff": 1 << 19, "n_heads": 4096, "n_kv_heads": 4096,
                "head_dim": 4096}
SHAPE_KEYS = WIDTHS + ("tied",)
ALIASES = {"heads": "n_heads", "kv_heads": "n_kv_heads", "layers": "n_layers"}   # --student-shape spellings

# Named shapes (published layouts; the vocabulary always comes from the teacher).
PRESETS = {
    "qwen2-0.5b": dict(n_layers=24, d_model=896, n_heads=14, n_kv_heads=2, head_dim=64, d_ff=4864, tied=1),
    "qwen2-1.5b": dict(n_layers=28, d_model=1536, n_heads=12, n_kv_heads=2, head_dim=128, d_ff=8960, tied=1),
    "qwen2-3b": dict(n_layers=36, d_model=2048, n_heads=16, n_kv_heads=2, head_dim=128, d_ff=11008, tied=1),
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128),
}


def parse_student_shape(text) -> dict:
    """``--student-shape`` -> spec dict of widths (n_layers, d_model, n_heads, n_kv_heads, head_dim,
    d_ff, tied). Items: a preset name (PRESETS) and ``key=value`` pairs, later items winning;
    keys as in STUDENT_KEYS's widths or their short forms (layers = a count here, heads, kv_heads)."""
    if isinstance(text, dict):
        return dict(text)
    out = {}
    items = [item.strip() for item in str(text or "").split(",") if item.strip()]
    for item in items:
        if "=" not in item:
            if item.lower() not in PRESETS:
                raise Q4KError(f"--student-shape: unknown preset {item!r} (known: {', '.join(PRESETS)}; "
                               "or key=value items such as layers=24,d_model=896,heads=14,kv_heads=2,d_ff=4864)")
            out.update(PRESETS[item.lower()])
            continue
        key, value = (s.strip() for s in item.split("=", 1))
        key = ALIASES.get(key, key)
        if key not in SHAPE_KEYS:
            raise Q4KError(f"--student-shape: unknown key {key!r} (known: layers, d_model, heads, kv_heads, "
                           "head_dim, d_ff, tied, or their long forms n_layers, n_heads, n_kv_heads)")
        try:
            out[key] = int(value)
        except ValueError:
            raise Q4KError(f"--student-shape {text!r}: {key} must be a whole number, got {value!r}") from None
    if not out:
        raise Q4KError(f"--student-shape {text!r}: give a preset ({', '.join(PRESETS)}) or key=value widths")
    return out


def parse_student_spec(spec) -> dict:
    """A student spec -> dict:
      'layers=5' | 'layers=0,9,18,27'   the teacher blocks copied (Student.from_teacher; distill's
                                        --student-layers): always block numbers, never a count
      'n_layers=4[,d_model=896,...]'    the teacher's widths, with these replaced
      'params=0.5e9'                    a qwen2-like student of about that many parameters
      'qwen2-0.5b[,n_layers=12]'        a preset, read as a --student-shape (parse_student_shape)
    A list of block numbers stands for 'layers=...'; a dict is taken as parsed."""
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, (list, tuple)):
        return {"layers": [int(i) for i in spec]}
    if str(spec or "").split(",")[0].strip().lower() in PRESETS:
        return parse_student_shape(spec)
    out, key = {}, None
    for item in (spec or "").split(","):
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key not in STUDENT_KEYS:
                raise Q4KError(f"--student: unknown key {key!r} (known: {', '.join(STUDENT_KEYS)})")
            out[key] = [value]
        elif key == "layers" and item.strip():     # layers=0,9,18,27: the teacher blocks kept
            out[key].append(item.strip())
        elif item.strip():
            raise Q4KError(f"--student {spec!r}: expected key=value items separated by commas")
    try:
        return {k: float(v[0]) if k == "params" else [int(x) for x in v] if k == "layers" else int(v[0])
                for k, v in out.items()}
    except ValueError:
        raise Q4KError(f"--student {spec!r}: values must be numbers") from None


def student_config(teacher: ModelConfig, spec: dict) -> ModelConfig:
    """The student's ModelConfig: the teacher's family and vocabulary, widths from ``spec``."""
    if "params" in spec:
        return config_with_params(teacher, spec["params"])
    cfg = teacher
    if "layers" in spec:                    # as Student.from_teacher(teacher, layers) builds it
        layers = spec["layers"]
        if "n_layers" in spec:
            raise Q4KError("student: give layers= (teacher blocks) or n_layers= (a count), not both")
        if not layers or len(layers) > WIDTH_LIMITS["n_layers"] or any(not 0 <= i < teacher.n_layers for i in layers):
            raise Q4KError(f"student layers {layers}: need teacher block numbers in 0..{teacher.n_layers - 1}")
        cfg = cfg.replace(n_layers=len(layers), swa_layers=[i for i, t in enumerate(layers) if t in teacher.swa_layers])
    widths = {k: spec[k] for k in WIDTHS if k in spec}
    for key, value in widths.items():          # before any division, and before a million-layer table
        if not 1 <= value <= WIDTH_LIMITS[key]:
            raise Q4KError(f"student: {key}={value} is outside 1..{WIDTH_LIMITS[key]}")
    if widths.keys() & {"d_model", "n_heads"}:
        n_heads = widths.get("n_heads", cfg.n_heads)
        widths.setdefault("head_dim", widths.get("d_model", cfg.d_model) // n_heads)
        widths.setdefault("n_kv_heads", math.gcd(cfg.n_kv_heads, n_heads))
    cfg = cfg.replace(**widths)
    if cfg.embed_scale != 1.0 and cfg.d_model != teacher.d_model:     # gemma3 scales by sqrt(d_model)
        cfg = cfg.replace(embed_scale=math.sqrt(cfg.d_model))
    if cfg.attn_scale is not None and cfg.head_dim != teacher.head_dim:   # a scale tied to the old head_dim
        cfg = cfg.replace(attn_scale=None)
    if "tied" in spec:
        cfg = cfg.replace(tied_output=bool(spec["tied"]))
    if min(cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) < 1:
        raise Q4KError(f"student: every width must be >= 1 ({spec})")
    if cfg.n_heads % cfg.n_kv_heads:
        raise Q4KError(f"student: n_heads {cfg.n_heads} is not a multiple of n_kv_heads {cfg.n_kv_heads}")
    return cfg.replace(swa_layers=[i for i in cfg.swa_layers if i < cfg.n_layers])


def config_with_params(teacher: ModelConfig, n_params: float) -> ModelConfig:
    """A qwen2-like student of about ``n_params`` parameters with the teacher's vocabulary.

    Shape rule, from Qwen2-0.5B (d 896, 24 layers, d_ff 4864, 14 heads of 64, 2 kv heads, tied):
    head_dim 64, d_ff = 5.43 d rounded to 64, kv heads = the largest divisor of the heads up to
    heads / 7. For each width d (multiples of 64) the layer count that best hits ``n_params``
    is taken; among widths within 5 % of the count, the one closest to Qwen2-0.5B's depth/width
    ratio wins (0.5e9 gives Qwen2-0.5B's shape).
    """
    if not 1e6 <= n_params <= 1e12:
        raise Q4KError(f"--student-params {n_params:g}: expected a count between 1e6 and 1e12")
    candidates = []
    for d in range(64, 16385, 64):
        heads = d // 64
        kv = max(k for k in range(1, heads + 1) if heads % k == 0 and k <= max(1, round(heads / 7)))
        cfg = teacher.replace(d_model=d, n_layers=1, d_ff=64 * round(5.43 * d / 64), n_heads=heads, n_kv_heads=kv,
                              head_dim=64, tied_output=True, swa_layers=[], sliding_window=None)
        one, per_layer = count_params(cfg), count_params(cfg.replace(n_layers=2)) - count_params(cfg)
        layers = max(1, round((n_params - one) / per_layer) + 1)
        error = abs(one + (layers - 1) * per_layer - n_params) / n_params
        aspect = abs(math.log(layers / d * 896 / 24))
        candidates.append((error > 0.05, aspect if error <= 0.05 else error, cfg.replace(n_layers=layers)))
    return min(candidates, key=lambda c: c[:2])[2]


def count_params(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for s in cfg.tensor_shapes().values())
