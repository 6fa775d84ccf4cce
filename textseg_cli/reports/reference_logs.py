"""Per-iteration training logs of official implementations, read into a table for `textseg plot --reference-log`.

Known format: AD-MT's (ZhenZHAO/AD-MT, code/train_post_3d_aut.py; the logs it ships in training-logs/), where
a training step writes `iteration:N  t-loss:X, loss-lb:X, loss-ulb:X, conflict/consist:X/X, weight:X, high-r:X,
conflic:N, lr:X, alt:True` (tqdm may print its bar in front of it on the same line), and a validation writes
`iteration N : dice_score: X best_dice: X` (the teacher's Dice, a fraction) followed by
` <<Test>> - Ep:E  - Dice-S/T:S/T, ...` (student / teacher Dice in percent).

`read_reference_log(path)` returns one row per iteration with the columns `iteration`, `loss` (the total `t-loss`),
the other terms as logged (`loss_lb`, `loss_ulb`, `conflict`, `consist`, `weight`, `high_r`, `conflic`, `lr`,
`alt`), and `dice` / `dice_student` (fractions) where a validation ran, NaN elsewhere. Anything else is a DataError
naming the file and the line, so a wrong file never plots as an empty curve.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from textseg_cli.errors import DataError

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"
_ADMT_STEP = re.compile(r"iteration:(\d+)\s+(t-loss:.*)$")
_ADMT_PAIR = re.compile(r"([A-Za-z][\w/-]*):(\S+?)(?:,|$)")
_ADMT_DICE = re.compile(rf"iteration (\d+) : dice_score: ({_NUMBER}) best_dice: ({_NUMBER})")
_ADMT_TEST = re.compile(rf"<<Test>> - Ep:\d+\s+- Dice-S/T:({_NUMBER})/({_NUMBER})")
_RENAME = {"t-loss": "loss"}
FORMATS = ("AD-MT (iteration:N  t-loss:..., iteration N : dice_score: ...)",)


def _excerpt(line: str, width: int = 60) -> str:
    line = line.strip()
    return repr(line if len(line) <= width else line[:width] + "...")


def _value(raw: str, path: Path, lineno: int, line: str, key: str) -> float:
    if raw in ("True", "False"):
        return float(raw == "True")
    try:
        return float(raw)
    except ValueError:
        raise DataError(f"line {lineno}: {key}:{raw} is not a number in {_excerpt(line)}", path) from None


def _admt_step(path: Path, lineno: int, line: str, it: str, rest: str) -> dict[str, float]:
    row: dict[str, float] = {"iteration": float(it)}
    for key, raw in _ADMT_PAIR.findall(rest):
        keys, raws = key.split("/"), raw.split("/")
        if len(keys) != len(raws):  # conflict/consist:0.0/0.0 holds two terms
            raise DataError(f"line {lineno}: {key}:{raw} pairs {len(keys)} name(s) with {len(raws)} value(s)", path)
        for k, r in zip(keys, raws):
            k = _RENAME.get(k, k).replace("-", "_")
            row[k] = _value(r, path, lineno, line, k)
    if "loss" not in row:
        raise DataError(f"line {lineno}: a training step without t-loss: {_excerpt(line)}", path)
    return row


def read_reference_log(path: str | Path) -> pd.DataFrame:
    """One row per iteration of an official per-iteration training log (see the module docstring); DataError with
    the file and line when the file is missing, unreadable or not in a known format."""
    path = Path(path)
    if not path.is_file():
        raise DataError("reference log not found", path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the reference log as text ({type(exc).__name__})", path) from None
    steps: list[dict[str, float]] = []
    dice: dict[int, dict[str, float]] = {}
    last_dice: int | None = None
    first_content: tuple[int, str] | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if first_content is None and line.strip():
            first_content = (lineno, line)
        if "iteration:" in line:
            m = _ADMT_STEP.search(line)
            if m is None:
                raise DataError(f"line {lineno}: not an AD-MT training step ('iteration:N  t-loss:X, ...'): "
                                f"{_excerpt(line)}", path)
            steps.append(_admt_step(path, lineno, line, m.group(1), m.group(2)))
        elif "dice_score" in line:
            m = _ADMT_DICE.search(line)
            if m is None:
                raise DataError(f"line {lineno}: not an AD-MT validation line ('iteration N : dice_score: X "
                                f"best_dice: X'): {_excerpt(line)}", path)
            last_dice = int(m.group(1))
            dice[last_dice] = {"dice": float(m.group(2))}
        elif "<<Test>>" in line and last_dice is not None:
            m = _ADMT_TEST.search(line)
            if m is not None:
                dice[last_dice]["dice_student"] = float(m.group(1)) / 100  # the log prints percent
    if not steps:
        where = f"line {first_content[0]}: {_excerpt(first_content[1])}" if first_content else "the file is empty"
        raise DataError(f"not a known per-iteration training log ({where}); known: {'; '.join(FORMATS)}", path)
    df = pd.DataFrame(steps)
    df["iteration"] = df["iteration"].astype(int)
    if df["iteration"].duplicated().any():
        it = int(df.loc[df["iteration"].duplicated(), "iteration"].iloc[0])
        raise DataError(f"iteration {it} is logged twice (two runs in one file?)", path)
    if dice:
        val = pd.DataFrame([{"iteration": it, **v} for it, v in dice.items()])
        df = df.merge(val, on="iteration", how="outer")
    df = df.sort_values("iteration", kind="stable").reset_index(drop=True)
    return df
