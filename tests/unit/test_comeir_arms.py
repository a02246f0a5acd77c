"""The named ComeIR settings (`comeir experiment --arms comeir-...`) are the README's measured rows: same config hash
as the committed result files, so a user adds seeds to those rows by name."""
import json
from pathlib import Path

import pytest

from comeir_dist.errors import UserError
from comeir_dist.train.experiment import COMEIR_ARMS, _run_config, arm_config, config_hash
from tests.fixtures import make_tiny_dataset, tiny_run_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _config(path: Path):
    from comeir_dist.config.base import load_yaml, parse_section
    from comeir_dist.config.run import RunConfig

    return parse_section(RunConfig, load_yaml(path), source=str(path))


# (arm, committed results, the config those runs used): the bundled data's fair protocol, and MovieLens' recipe
CASES = [(arm, REPO / "docs/results/scientific_fair", REPO / "configs/experiment_cpu.yaml") for arm in sorted(COMEIR_ARMS)]
CASES.append(("comeir-decoder-noeng", REPO / "docs/results/movielens_recipe",
              REPO / "docs/results/movielens_recipe/recipe_movielens_r15.yaml"))


@pytest.mark.parametrize("arm,results,config", CASES, ids=[f"{a}-{r.name}" for a, r, _ in CASES])
def test_every_comeir_arm_reproduces_its_committed_results(arm, results, config):
    files = sorted(results.glob(f"{arm}-seed[0-9]*.json"))
    assert files, f"no committed result for arm {arm} in {results}"
    cfg = arm_config(_config(config), arm)
    for f in files:
        row = json.loads(f.read_text())
        run_cfg = _run_config(cfg, "comeir", row["seed"], Path(cfg.out) / f"{arm}-seed{row['seed']}")
        assert config_hash(run_cfg) == row["config_hash"], f.name


def test_comeir_arms_refuse_other_variants_and_run_comeir_by_default(tiny, tmp_path, monkeypatch):
    import yaml

    from comeir_dist.cli import main
    from comeir_dist.train import experiment

    cfg = tiny_run_config(tiny, tmp_path / "exp")
    with pytest.raises(UserError, match="--variants comeir"):
        experiment.run_experiment(cfg, ["tm"], 1, arms=["comeir-dot-xfit-noeng"])
    assert not (tmp_path / "exp" / "results").exists()  # refused before anything ran
    noeng = arm_config(cfg, "comeir-dot-xfit-noeng").model
    assert (noeng.head_interaction, noeng.ablations) == ("dot", ["no_e_intra", "no_e_inter"])
    assert COMEIR_ARMS["comeir-dot-xfit-noeng"]["model.ablations"] == ["no_e_intra", "no_e_inter"]  # not aliased

    seen = {}
    monkeypatch.setattr(experiment, "run_experiment",
                        lambda cfg, variants, seeds, label=None, overwrite=False, arms=None: seen.update(
                            variants=variants, arms=arms) or "table")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["experiment", "--config", str(path), "--arms", "comeir-dot,comeir-dot-xfit-noeng", "--seeds", "1"]) == 0
    assert seen == {"variants": ["comeir"], "arms": ["comeir-dot", "comeir-dot-xfit-noeng"]}
    assert main(["experiment", "--config", str(path), "--arms", "decor-base", "--seeds", "1"]) == 0
    assert seen["variants"] == ["flatten"]
