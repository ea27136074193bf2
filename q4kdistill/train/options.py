"""Typed run settings: the one function that turns flags and JSON values into DistillConfig values.

    typed_settings({"steps": "10"}, "flags", from_text=True)   -> {"steps": 10}
    typed_settings({"steps": "ten"}, "run.json")               -> Q4KError "run.json: steps ..."

Flags arrive as text (argparse keeps them as strings, so a bad one is this module's one-line
error, not argparse's); JSON values arrive typed and must already be of the right type: an int
is an int (not "10", not true), a bool is a bool (not "no"), a float is a finite number. Every
value is range-checked, so nothing downstream divides by zero, loops a billion times or seeds a
generator with -1. ``DistillConfig.from_dict`` and ``validated`` call this too.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import Q4KError

# teacher.model.BACKENDS, repeated so that checking a flag imports no kernels (a test keeps them equal)
TEACHER_BACKENDS = ("auto", "native", "dense", "dequant-f32", "dequant-bf16", "dequant-f16")
LOSSES = ("kl", "rkl", "jsd", "skl", "srkl", "tvd")
BIG = 10 ** 9
MAX_LAYERS = 4096


@dataclass(frozen=True)
class Rule:
    kind: type                      # int | float | str | bool | list (block numbers)
    low: float | None = None        # inclusive bounds (numbers; list items)
    high: float | None = None
    above: bool = False             # low is exclusive: value > low
    below: bool = False             # high is exclusive: value < high
    choices: tuple = ()
    optional: bool = False          # None allowed

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        what = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                list: "block numbers like 0,3,6"}[self.kind]
        if self.low is not None:
            what += f" {'>' if self.above else '>='} {self.low:g}"
        if self.high is not None:
            what += f" and {'<' if self.below else '<='} {self.high:g}"
        return what + (" (or null)" if self.optional else "")


RULES = {
    "teacher": Rule(str), "data": Rule(str), "out": Rule(str),
    "student_layers": Rule(list, 0, MAX_LAYERS - 1, optional=True),
    "student_init": Rule(str, optional=True),
    "steps": Rule(int, 1, BIG), "batch": Rule(int, 1, 1 << 16), "seq": Rule(int, 2, 1 << 20),
    "lr": Rule(float, 0, above=True), "warmup": Rule(int, 0, BIG), "min_lr_ratio": Rule(float, 0, 1),
    "weight_decay": Rule(float, 0, 10), "clip": Rule(float, 0, 1e9), "loss": Rule(str, choices=LOSSES),
    "temperature": Rule(float, 0, 1e3, above=True), "alpha": Rule(float, 0, 1), "beta": Rule(float, 0, 1),
    "top_k": Rule(int, 1, 1 << 24, optional=True), "chunk_tokens": Rule(int, 1, 1 << 24),
    "checkpoint_activations": Rule(bool), "eval_every": Rule(int, 1, BIG), "eval_batches": Rule(int, 1, 1 << 20),
    "save_every": Rule(int, 1, BIG), "seed": Rule(int, 0, 2 ** 32 - 1), "truncate_vocab": Rule(bool),
    "heldout": Rule(float, 0, 1, below=True), "teacher_backend": Rule(str, choices=TEACHER_BACKENDS),
    "gpu_memory": Rule(str, optional=True),   # a size or "auto": parsed by memory.fit.parse_bytes
    "student_shape": Rule(str, optional=True), "precision": Rule(str, choices=("auto", "bf16", "fp32")),
    "chat_template": Rule(str, optional=True), "teacher_cache": Rule(str, optional=True),
    "skew_alpha": Rule(float, 0, 1, below=True), "gpus": Rule(int, 1, 1024), "cuda_graph": Rule(bool),
}


def typed_settings(raw: dict, source: str, from_text: bool = False) -> dict:
    """{name: value} -> {name: typed value}; Q4KError (one line) for an unknown name or a bad value."""
    if not isinstance(raw, dict):
        raise Q4KError(f"{source}: expected an object of settings, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in RULES:
            raise Q4KError(f"{source}: unknown setting {str(key)[:40]!r} (known: {', '.join(RULES)})")
        out[name] = typed_value(name, value, source, from_text)
    return out


def typed_value(name: str, value, source: str, from_text: bool = False):
    """One setting, typed (from text when ``from_text``) and range-checked."""
    rule = RULES[name]
    shown = "--" + name.replace("_", "-") if from_text else name
    try:
        if value is None:
            if rule.optional:
                return None
            raise ValueError
        if rule.kind is list:
            return _layers(value, rule)
        if from_text and isinstance(value, str) and rule.kind is not str:
            value = _parse_text(value, rule.kind)
        return _checked(value, rule)
    except ValueError:
        raise Q4KError(f"{source}: {shown} = {_show(value)}: expected {rule.describe()}") from None


def _parse_text(text: str, kind):
    text = text.strip()
    if kind is bool:
        words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
        if text.lower() not in words:
            raise ValueError
        return words[text.lower()]
    if kind is int and len(text) > 40:            # int() of a huge decimal string is quadratic
        raise ValueError
    return kind(text)


def _checked(value, rule: Rule):
    kind = rule.kind
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError
        return value
    if kind is str:
        if isinstance(value, os.PathLike) and not rule.choices:      # DistillConfig(teacher=Path(...))
            value = os.fspath(value)
        if not isinstance(value, str) or (rule.choices and value not in rule.choices):
            raise ValueError
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError
    value = kind(value)
    if kind is float and not math.isfinite(value):
        raise ValueError
    if rule.low is not None and (value < rule.low or (rule.above and value == rule.low)):
        raise ValueError
    if rule.high is not None and (value > rule.high or (rule.below and value == rule.high)):
        raise ValueError
    return value


def _layers(value, rule: Rule) -> list:
    """Block numbers from a list of ints or a text "0,3,6,9"."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        if len(parts) > MAX_LAYERS or any(len(p) > 6 for p in parts):
            raise ValueError
        value = [int(p) for p in parts]
    if not isinstance(value, (list, tuple)) or not value or len(value) > MAX_LAYERS:
        raise ValueError
    return [_checked(v, Rule(int, rule.low, rule.high)) for v in value]


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(name: str, value, low: int, high: int) -> int:
    """A CLI integer of another command (``generate -n``, ``plan --batch``) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Q4KError(f"{name} = {_show(value)}: expected an integer >= {low} and <= {high}")
    return value
