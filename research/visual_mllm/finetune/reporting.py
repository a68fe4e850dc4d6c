"""What a finetuning run shows and leaves behind: a CSV log, a loss-curve PNG and a progress bar.

`train_log.csv` has one row per step (columns `CSV_FIELDS`); a resumed run keeps the rows up to the
checkpoint it resumes from and rewrites the rest, so the file always describes one continuous run.
`loss_curve.png` is drawn with Pillow (no plotting library needed): the loss per step, and a dashed
marker where a run was resumed.
"""
import csv
import math
import os
import sys
import time

from PIL import Image, ImageDraw, ImageFont

from ..atomic import write_atomic

CSV_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "loss_scale", "skipped", "step_time_s",
              "samples_per_s")


class TrainLog:
    """Appends rows to the CSV; `rows` holds them (floats parsed) for the plot."""

    def __init__(self, path, resume_step=None):
        self.path = path
        self.rows = []
        self.resumed_at = []
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8", newline="") as f:
                for row in csv.DictReader(f):
                    if int(row["step"]) <= resume_step:
                        self.rows.append(_parse(row))
            self.resumed_at.append(resume_step)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow(_format(row))

    def add(self, **row):
        row = {k: row.get(k) for k in CSV_FIELDS}
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow(_format(row))

    def losses(self):
        return [(r["step"], r["loss"]) for r in self.rows]


def _parse(row):
    out = {}
    for key in CSV_FIELDS:
        value = row.get(key, "")
        if key in ("step", "epoch", "skipped"):
            out[key] = int(value) if value not in ("", None) else 0
        else:
            out[key] = float(value) if value not in ("", None) else float("nan")
    return out


def _format(row):
    out = {}
    for key in CSV_FIELDS:
        value = row.get(key)
        if isinstance(value, float):
            out[key] = repr(value)  # exact: a resumed run compares losses bit for bit
        else:
            out[key] = value
    return out


def read_log(path):
    with open(path, encoding="utf-8", newline="") as f:
        return [_parse(row) for row in csv.DictReader(f)]


def _nice_ticks(lo, hi, count=5):
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 0.5:
        if value >= lo - 1e-12:
            ticks.append(value)
        value += step
    return ticks


def plot_loss(points, path, title="training loss", resumed_at=(), size=(800, 480)):
    """Draw loss against step (points: [(step, loss)]) into a PNG; returns the path."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    points = [(s, l) for s, l in points if l is not None and math.isfinite(l)]
    draw.text((left, 12), title, fill="black", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if points:
        steps = [s for s, _ in points]
        losses = [l for _, l in points]
        x0, x1 = min(steps), max(max(steps), min(steps) + 1)
        y0, y1 = min(0.0, min(losses)), max(losses) * 1.05 or 1.0

        def xy(step, loss):
            x = left + (step - x0) / (x1 - x0) * (width - left - right)
            y = height - bottom - (loss - y0) / (y1 - y0) * (height - top - bottom)
            return x, y

        for tick in _nice_ticks(y0, y1):
            _, y = xy(x0, tick)
            draw.line([left - 4, y, left, y], fill="black")
            draw.line([left + 1, y, width - right - 1, y], fill=(230, 230, 230))
            draw.text((8, y - 6), f"{tick:.3g}", fill="black", font=font)
        for tick in _nice_ticks(x0, x1):
            if tick < x0 or tick > x1:
                continue
            x, _ = xy(tick, y0)
            draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
            draw.text((x - 8, height - bottom + 8), f"{tick:g}", fill="black", font=font)
        for step in resumed_at:
            x, _ = xy(step, y0)
            for y in range(top, height - bottom, 8):
                draw.line([x, y, x, y + 4], fill=(200, 120, 0))
            draw.text((x + 4, top + 4), "resumed", fill=(200, 120, 0), font=font)
        line = [xy(s, l) for s, l in points]
        if len(line) > 1:
            draw.line(line, fill=(31, 119, 180), width=2)
        else:
            x, y = line[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    draw.text((width // 2 - 10, height - 20), "step", fill="black", font=font)
    draw.text((left - 40, top - 28), "loss", fill="black", font=font)
    return write_atomic(path, img.save)


class Progress:
    """A tqdm bar with loss, lr and samples/s (quiet when disabled, e.g. on ranks other than 0)."""

    def __init__(self, total, initial=0, enabled=True, desc="finetune"):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)
        self.start = time.perf_counter()

    def update(self, loss, lr, samples_per_s):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", samples_s=f"{samples_per_s:.1f}",
                                 refresh=False)
            self.bar.update(1)

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


__all__ = ["TrainLog", "plot_loss", "read_log", "Progress", "CSV_FIELDS"]
