"""recipes/*.yaml hold the launchers' hyper-parameters: every recipe loads through the trainers' own
config loader (the job's config class, chosen by the file name's prefix) and names no per-user path;
every launcher passes one existing recipe of its own job and sets no hyper-parameter itself."""
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from aplot_rlhf.config import PPOConfig, RMConfig, load_config
from helpers import REPO

RECIPES = sorted((REPO / "recipes").glob("*"))
LAUNCHERS = sorted(p for p in (REPO / "launchers").iterdir()
                   if p.suffix in (".sh", ".sbatch") and not p.name.startswith("_"))
# job (the recipe name's prefix) -> config class, trainer module, the path flags a run needs besides the recipe
JOBS = {"rm": (RMConfig, "train_rm", ["--model_name_or_path", "m", "--train_data", "d.jsonl"]),
        "ppo": (PPOConfig, "train_ppo", ["--actor_model", "a", "--reward_model", "r", "--prompt_data", "p.jsonl"])}
# per user, not per recipe: the launchers pass these (from MODEL, DATA, ACTOR, RM, PROMPTS, OUT)
USER_PATHS = {"model_name_or_path", "tokenizer_name_or_path", "gguf_file", "train_data", "eval_data", "output_dir",
              "actor_model", "actor_gguf_file", "reward_model", "reference_model", "prompt_data"}
RUN_CONTROL = {"dry_run", "resume"}  # DRY_RUN=1 and the slurm requeue add these


def job_of(recipe: Path):
    prefix = recipe.name.split("_")[0]
    assert prefix in JOBS, f"{recipe.name}: a recipe's name starts with its job ({', '.join(f'{j}_' for j in JOBS)})"
    return JOBS[prefix]


def test_the_shipped_recipes_are_there():
    assert {"rm_8b.yaml", "rm_13b.yaml", "rm_70b.yaml", "ppo_8b.yaml", "ppo_8b_grpo.yaml", "ppo_13b.yaml",
            "ppo_70b.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_through_the_trainers_config_loader(path):
    assert path.suffix == ".yaml", f"{path.name}: recipes are YAML files"
    cls, _, paths = job_of(path)
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw, f"{path.name}: a mapping of config keys"
    assert not raw.keys() & USER_PATHS, (f"{path.name} names per-user paths {sorted(raw.keys() & USER_PATHS)}: "
                                         "the launcher passes them")
    cfg = load_config(cls, ["--config", str(path), *paths])  # unknown keys, wrong types and bad values raise here
    assert {k: getattr(cfg, k) for k in raw} == raw
    for key in ("ds_config", "critic_ds_config", "reference_ds_config"):
        if getattr(cfg, key, ""):
            assert (REPO / getattr(cfg, key)).is_file(), (f"{path.name}: {key} {getattr(cfg, key)} not found "
                                                          "(relative to the repo root)")
    override = load_config(cls, ["--config", str(path), *paths, "--learning_rate", "1.5e-5"])
    assert override.learning_rate == 1.5e-5  # a flag given with the recipe wins over it


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_passes_an_existing_recipe_of_its_job(path):
    text = path.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#") and not line.startswith("#SBATCH"))
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    trainers = set(re.findall(r"aplot_rlhf\.cli\.(train_\w+)", code))
    assert len(trainers) == 1, f"{path.name} starts {sorted(trainers)}"
    recipes = re.findall(r"--config (\S+)", code)
    assert len(recipes) == 1 and recipes[0].startswith("recipes/"), f"{path.name}: --config {recipes}"
    recipe = REPO / recipes[0]
    assert recipe.is_file(), f"{path.name}: {recipes[0]} does not exist"
    cls, trainer, _ = job_of(recipe)
    assert trainer in trainers, f"{path.name} runs {sorted(trainers)} with the {trainer} recipe {recipes[0]}"
    assert recipes[0] in header, f"{path.name}: the header comment should point at {recipes[0]}"
    fields = {f.name for f in dataclasses.fields(cls)}
    own = set(re.findall(r"--(\w+)", code)) & fields - USER_PATHS - RUN_CONTROL
    assert not own, f"{path.name} sets {sorted(own)} itself: hyper-parameters belong in {recipes[0]}"
