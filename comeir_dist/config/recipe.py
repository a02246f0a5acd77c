"""`comeir recipe`: an experiment config derived from a prepared dataset's statistics (a recipe that transfers).

The fair protocol of ``configs/experiment_cpu.yaml`` (train until validation stops improving, plateau halving,
all validation users) is dataset-independent; what is not are the sizes hand-set for the bundled data. This
module derives them from the numbers a dataset has -- training samples, users, the length distribution of the
histories -- with one stated rule per setting, so a user's first run on their own data is sized for that data:

* ``max_history``: the history length that covers ``HISTORY_QUANTILE`` of the users' full test histories,
  rounded up to 10, at least ``HISTORY_FLOOR``, at most ``history_cap`` (default 50: flatten feeds 3 tokens per
  item, so its input grows 3x; longer pasts are the preference memory's job, ``model.pref_memory``).
* ``model.backbone.max_positions``: flatten's ``L * max_history + L + 1`` plus L NEZHA placeholders, rounded up
  to 32 (rotary positions: no parameters depend on it).
* ``train.batch_size``: the largest power of two <= 256 that still gives ``MIN_STEPS_PER_EPOCH`` optimizer
  steps per epoch (at least 16): small data gets more, smaller updates instead of a handful per epoch.
* ``train.lr``: 2e-3 at batch 256, scaled by sqrt(batch / 256) (Adam's usual square-root rule).
* ``train.warmup_steps``: 0.4 epoch (50 steps on the bundled data), rounded to 10, clamped to [10, 1000].
* validation every 0.5 epoch with patience 4 (2 epochs) when an epoch has >= ``MIN_STEPS_PER_EPOCH`` steps,
  else every epoch with patience 2 -- the same 2-epoch patience in both cases; all validation users
  (``eval_users: null``, the protocol; the experiment table reports the standard error).
* ``train.sample_mode: auto``: the variants that can train on every position of a window (flatten, tm and comeir
  with normal decoding, sasrec) do, NEZHA decoding trains on prefixes (config.run.resolve_sample_mode).
  Their batch (``train.sequence_batch_size``) is the number of windows (``ceil((n - 1) / max_history)`` per user)
  that carry the targets of one prefix batch on average, and their warm-up (``train.sequence_warmup_steps``) the
  0.4 epoch rule on those steps: both modes take the same steps per epoch over the same targets per step. 64 and
  50 on the bundled data (4 targets per window: the values of the README's flatten all-position runs), 6 and 140
  on MovieLens (43 per window). Round 14 sized windows with the sample rules instead (16 windows, ~680 targets and
  130 steps per epoch on MovieLens): ComeIR, which peaks within a few epochs, then stayed at the most-popular
  baseline there (test NDCG@10 0.0226), with 6 windows it tests at 0.0274 +- 0.0013 (3 seeds; README). Why all
  positions: on MovieLens flatten trained on prefixes stayed at the most-popular baseline (0.0207 test NDCG@10)
  and on every position reached 0.0317 (3 seeds); on the bundled data the two modes are equal (0.0524 vs 0.0530,
  README). One pass per window instead of one per prefix is also what makes long histories affordable
  (MovieLens: 2,072 windows instead of 88,444 prefix samples).
* ``train.lr_schedule``: plateau halving (the protocol) when there are at least ``NOISY_VALIDATION_USERS``
  validation users; below that, a constant rate after warm-up, validation every epoch, patience 6 epochs and up
  to 60 epochs. Why: plateau halving reads "no better than the best so far" as "converged", but the standard
  error of NDCG@10 grows as 1/sqrt(users) (~0.002 on the bundled data's 8,317, ~0.005 on MovieLens' 610), so on
  few users it halves the rate on noise. Measured on MovieLens (sasrec, recent 20 items, 3 seeds each, README
  *Accuracy on MovieLens*): plateau + 2 epochs of patience 0.0435 / 0.0298 / 0.0221 test NDCG@10, constant + 6
  epochs 0.0493 / 0.0344 / 0.0441. The threshold lies between the two datasets; it is not tuned.
* Validation targets (not a config key: the dataset's split): with fewer than ``NOISY_VALIDATION_USERS``
  validation targets the recipe says so and names ``comeir prepare --valid-targets K`` with K =
  ceil(2000 / users), at most ``MAX_VALID_TARGETS`` (MovieLens: 4). The schedule rule above still counts distinct
  users: the targets of one user are correlated, and the constant-rate rule was measured per user.
* Test targets (likewise the split): with fewer than ``NOISY_VALIDATION_USERS`` test targets the recipe names
  ``comeir prepare --test-targets K`` (the same K rule): one test item per user leaves a standard error (~0.006
  NDCG@10 on MovieLens' 610 users) as large as the differences a table should decide; K per user, with standard
  errors clustered by user, shrinks it (README *Four test targets per user on MovieLens*).
* The model (backbone, Engram sizes) stays the CPU experiment's: on the bundled data 4x larger tables (the
  paper's s_S 1, s_T 2, d_m 256) did not change test NDCG@10 (README); check the tables against the data's
  keys with ``comeir analyze keys --config THE_RECIPE.yaml`` (occupancy, private rows).

On the bundled data the recipe reproduces ``configs/experiment_cpu.yaml`` (max_history 20, batch 256, lr 2e-3,
warm-up 50; positions 96 instead of 128; sample_mode auto instead of prefix).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from comeir_dist.errors import UserError

HISTORY_QUANTILE = 0.95
HISTORY_FLOOR = 20
HISTORY_CAP = 50
MIN_STEPS_PER_EPOCH = 100
BASE_BATCH, BASE_LR = 256, 2e-3
MIN_BATCH = 16
WARMUP_EPOCHS = 0.4
NOISY_VALIDATION_USERS = 2000
MAX_VALID_TARGETS = 10
# the file's first line; `comeir recipe` replaces only files that start with it (or with --overwrite)
MARKER = "# written by `comeir recipe`"


@dataclass(frozen=True)
class DatasetProfile:
    """What the recipe reads from a prepared dataset."""

    dataset: str
    users: int
    items: int
    train_samples: int
    valid_users: int  # distinct users in valid.parquet
    valid_targets: int  # its rows (``comeir prepare --valid-targets K``: up to K per user)
    history_p50: float
    history_p95: float
    history_max: int
    sid_method: str
    # items per user in train.parquet (the all-position windows are counted from them); not printed
    train_lengths: tuple[int, ...] = field(default=(), repr=False)
    test_targets: int = field(default=0, repr=False)  # rows of test.parquet (``--test-targets K``)

    def windows(self, width: int) -> int:
        """All-position training windows at ``max_history = width`` (train/sequence_samples.py, one segment)."""
        return sum(math.ceil((n - 1) / width) for n in self.train_lengths if n > 1)


def _sid_method(dataset_dir: Path) -> str:
    from comeir_dist.data.schema import sids_dir

    for method in ("rqkmeans", "rqvae"):
        if (sids_dir(dataset_dir, method) / "codes.parquet").is_file():
            return method
    raise UserError(f"{dataset_dir}/sids: no semantic IDs (run `comeir quantize --dataset {dataset_dir} --method "
                    f"rqkmeans` first)")


def dataset_profile(dataset_dir: str | Path) -> DatasetProfile:
    """Users, items, training samples and the distribution of users' full histories (each user's last test row)
    of a prepared dataset."""
    import pyarrow.compute as pc

    from comeir_dist.data.dataset import read_split, read_stats
    from comeir_dist.train.samples import require_training_samples

    stats = read_stats(dataset_dir)
    test = read_split(dataset_dir, "test")
    if test.num_rows == 0:
        raise UserError(f"{dataset_dir}/test.parquet: no users")
    lengths = _last_history_lengths(test)
    train_items = pc.list_value_length(read_split(dataset_dir, "train").column("items")).to_numpy(zero_copy_only=False)
    valid = read_split(dataset_dir, "valid")
    return DatasetProfile(dataset=str(dataset_dir), users=int(stats["users"]), items=int(stats["items"]),
                          train_samples=require_training_samples(dataset_dir),
                          valid_users=len(pc.unique(valid.column("user_idx"))), valid_targets=valid.num_rows,
                          history_p50=float(np.percentile(lengths, 50)),
                          history_p95=float(np.percentile(lengths, 100 * HISTORY_QUANTILE)),
                          history_max=int(lengths.max()), sid_method=_sid_method(Path(dataset_dir)),
                          train_lengths=tuple(int(n) for n in train_items), test_targets=test.num_rows)


def _last_history_lengths(test) -> np.ndarray:
    """History length of each user's last test row (its full history; ``--test-targets K`` gives K rows)."""
    import pyarrow.compute as pc

    users = test.column("user_idx").to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = pc.list_value_length(test.column("history")).to_numpy(zero_copy_only=False).astype(np.int64)
    longest = np.full(int(users.max()) + 1, -1, np.int64)
    np.maximum.at(longest, users, lengths)
    return longest[longest >= 0]


def _targets_per_user(rows: int, users: int) -> int | None:
    """Targets per user that would give >= NOISY_VALIDATION_USERS rows (at most MAX_VALID_TARGETS), when a split
    has fewer rows than that and more than one per user would help; else None."""
    if rows >= NOISY_VALIDATION_USERS or users == 0:
        return None
    k = min(MAX_VALID_TARGETS, math.ceil(NOISY_VALIDATION_USERS / users))
    return k if k * users > rows else None


def suggested_valid_targets(profile: DatasetProfile) -> int | None:
    """``comeir prepare --valid-targets K`` for a dataset with few validation targets, else None."""
    return _targets_per_user(profile.valid_targets, profile.valid_users)


def suggested_test_targets(profile: DatasetProfile) -> int | None:
    """``comeir prepare --test-targets K`` for a dataset with few test targets, else None (also when the profile
    does not know its test rows)."""
    return _targets_per_user(profile.test_targets, profile.users) if profile.test_targets else None


def held_out_note(profile: DatasetProfile) -> str | None:
    """The advice printed and written when :func:`suggested_valid_targets` or :func:`suggested_test_targets` has
    one."""
    kv, kt = suggested_valid_targets(profile), suggested_test_targets(profile)
    if kv is None and kt is None:
        return None
    few = [f"{profile.valid_targets:,} validation targets select the checkpoints"] if kv else []
    few += [f"{profile.test_targets:,} test targets measure the result"] if kt else []
    flags = (f" --valid-targets {kv}" if kv else "") + (f" --test-targets {kt}" if kt else "")
    return (f"only {' and '.join(few)}; `comeir prepare ...{flags}` on a copy of the dataset dir (its embeddings and "
            f"SIDs stay: same items) gives more per user, with standard errors clustered by user")


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)


def _batch_size(samples: int) -> int:
    """The largest power of two <= BASE_BATCH giving >= MIN_STEPS_PER_EPOCH steps per epoch (floor MIN_BATCH)."""
    batch = BASE_BATCH
    while batch > MIN_BATCH and samples / batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return batch


def _sequence_batch_size(batch: int, samples: int, windows: int) -> int:
    """Windows per step carrying, on average, the targets of one prefix batch (at least 1): both sample modes
    then take the same optimizer steps per epoch over the same number of targets per step."""
    return max(1, round(batch * windows / samples))


def _warmup_steps(steps_per_epoch: float) -> int:
    """WARMUP_EPOCHS of optimizer steps, rounded to 10, within [10, 1000]."""
    return min(1000, max(10, int(round(WARMUP_EPOCHS * steps_per_epoch / 10.0)) * 10))


def derive_recipe(profile: DatasetProfile, base: dict, history_cap: int = HISTORY_CAP,
                  out: str | None = None) -> tuple[dict, list[str]]:
    """(config dict = ``base`` with the derived keys replaced, one 'key: value -- why' line per derived key)."""
    if history_cap < 1:
        raise UserError(f"--history-cap {history_cap}: must be >= 1")
    cfg = {**base, "engram": dict(base.get("engram", {})), "train": dict(base.get("train", {})),
           "model": {**base.get("model", {}), "backbone": dict(base.get("model", {}).get("backbone", {}))}}
    why: list[str] = []
    levels = int(cfg["engram"].get("levels", 3))

    hist = min(history_cap, max(HISTORY_FLOOR, _round_up(profile.history_p95, 10)))
    why.append(f"max_history: {hist} -- {HISTORY_QUANTILE:.0%} of test histories have <= "
               f"{profile.history_p95:g} items (median {profile.history_p50:g}, max {profile.history_max}); "
               f"rounded up to 10, floor {HISTORY_FLOOR}, cap {history_cap}")
    positions = _round_up(levels * hist + 2 * levels + 1, 32)
    why.append(f"model.backbone.max_positions: {positions} -- flatten's {levels} x {hist} tokens + {levels} SID "
               f"positions + BOS + {levels} NEZHA placeholders, rounded up to 32")

    batch = _batch_size(profile.train_samples)
    steps = profile.train_samples / batch
    why.append(f"train.batch_size: {batch} -- {profile.train_samples:,} training samples = {steps:.0f} steps per "
               f"epoch (largest power of two <= {BASE_BATCH} with >= {MIN_STEPS_PER_EPOCH} steps, floor {MIN_BATCH})")
    lr = float(f"{BASE_LR * math.sqrt(batch / BASE_BATCH):.3g}")
    why.append(f"train.lr: {lr:g} -- {BASE_LR:g} at batch {BASE_BATCH}, scaled by sqrt(batch / {BASE_BATCH})")
    warmup = _warmup_steps(steps)
    why.append(f"train.warmup_steps: {warmup} -- {WARMUP_EPOCHS} epoch, rounded to 10, within [10, 1000]")
    windows = profile.windows(hist)
    if windows == 0:
        raise UserError(f"{profile.dataset}/train.parquet: no user has 2 training items (nothing to train on)")
    seq_batch = _sequence_batch_size(batch, profile.train_samples, windows)
    seq_warmup = _warmup_steps(windows / seq_batch)
    why.append(f"train.sample_mode: auto, train.sequence_batch_size: {seq_batch}, train.sequence_warmup_steps: "
               f"{seq_warmup} -- the variants with normal decoding train on every position of {windows:,} windows of "
               f"<= {hist} items ({profile.train_samples / windows:.1f} targets each): {seq_batch} windows carry the "
               f"{batch} targets of a prefix batch, {windows / seq_batch:.0f} steps per epoch; NEZHA on prefixes")
    schedule, max_epochs = "plateau", cfg["train"].get("max_epochs", 30)
    if profile.valid_users < NOISY_VALIDATION_USERS:
        schedule, every, patience, max_epochs = "constant", 1.0, 6, 60
        why.append(f"train.eval_every_epochs: 1, train.patience: 6, train.lr_schedule: constant, train.max_epochs: 60 "
                   f"-- only {profile.valid_users:,} validation users (< {NOISY_VALIDATION_USERS:,}): NDCG@10's "
                   f"standard error is large, so a non-improving validation is often noise; keep the rate and stop "
                   f"after 6 epochs without a better validation NDCG@10 ({profile.valid_targets:,} validation targets)")
    else:
        every, patience = (0.5, 4) if steps >= MIN_STEPS_PER_EPOCH else (1.0, 2)
        why.append(f"train.eval_every_epochs: {every:g}, train.patience: {patience} -- stop after 2 epochs without "
                   f"a better validation NDCG@10 on all {profile.valid_users:,} validation users (plateau halving)")

    cfg.update(dataset=profile.dataset, sid_method=profile.sid_method, max_history=hist)
    if out is not None:
        cfg["out"] = out
    cfg["model"]["backbone"]["max_positions"] = positions
    cfg["train"].update(batch_size=batch, lr=lr, warmup_steps=warmup, eval_every_epochs=every, patience=patience,
                        eval_users=None, lr_schedule=schedule, max_minutes=None, max_epochs=max_epochs,
                        sample_mode="auto", sequence_batch_size=seq_batch, sequence_warmup_steps=seq_warmup)
    return cfg, why


def recipe_text(cfg: dict, why: list[str], profile: DatasetProfile, base_path: str) -> str:
    """The YAML file: the marker, the derivations as comments, then the config."""
    import yaml

    head = [MARKER + f" from {profile.dataset} (base: {base_path}); the derived settings and why:"]
    head += [f"#   {line}" for line in why]
    note = held_out_note(profile)
    if note:
        head.append(f"# NOTE: {note}")
    head += ["# everything else is the base config's (the fair protocol). Dataset profile:",
             "#   " + ", ".join(f"{k} {v}" for k, v in asdict(profile).items() if k not in ("dataset", "train_lengths"))]
    return "\n".join(head) + "\n" + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def write_recipe(out: str | Path, text: str, overwrite: bool = False) -> None:
    """Atomically write ``text`` to ``out``; an existing file is replaced only if ``comeir recipe`` wrote it."""
    from comeir_dist.utils.atomic import atomic_file

    out = Path(out)
    if out.is_file() and not overwrite:
        try:
            first = out.read_text(encoding="utf-8").splitlines()[:1]
        except (OSError, UnicodeDecodeError):
            first = []
        if not first or not first[0].startswith(MARKER):
            raise UserError(f"{out}: exists and was not written by `comeir recipe`; choose another --out or pass "
                            f"--overwrite")
    with atomic_file(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
