"""The package's shape: layers import downwards only, with no cycle; every model role goes through one loader
with the same checks; setup.py builds the package from a clean copy."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from helpers import PYTHON, REPO, python_env

PKG = REPO / "aplot_rlhf"


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, function-level imports included (a lazy import still ties
    two layers together)."""
    def name(p: Path) -> str:
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    mods = {name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            deps |= {c for c in candidates if c in mods and c != mod}
        graph[mod] = deps
    return graph


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(mod, path):
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = 2
    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


# a lower layer never imports a higher one (README, "Layout"); data.collate builds packed batches with
# models.packing's layout (the attention op and the layout it reads are kept in one module)
HIGHER = {"aplot_rlhf.models": ("engine", "rewards", "rollout", "trainers", "cli"),
          "aplot_rlhf.data": ("engine", "rewards", "rollout", "trainers", "cli"),
          "aplot_rlhf.ot": ("engine", "models", "data", "rewards", "rollout", "trainers", "cli"),
          "aplot_rlhf.losses": ("engine", "models", "data", "rewards", "rollout", "trainers", "cli"),
          "aplot_rlhf.engine": ("rewards", "rollout", "trainers", "cli")}


def test_layers_import_downwards_only():
    bad = []
    for mod, deps in import_graph().items():
        for layer, above in HIGHER.items():
            if mod == layer or mod.startswith(layer + "."):
                bad += [f"{mod} imports {d}" for d in deps
                        if any(d == f"aplot_rlhf.{a}" or d.startswith(f"aplot_rlhf.{a}.") for a in above)]
    assert bad == [], bad


# ------------------------------------------------------------------ one loader, every role

@pytest.fixture(scope="module")
def no_tokenizer_model(tiny_llama_dir, tmp_path_factory) -> str:
    """A real model folder (config.json + weights) whose tokenizer files were not copied."""
    out = tmp_path_factory.mktemp("no_tokenizer")
    for f in Path(tiny_llama_dir).iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return str(out)


def test_every_role_refuses_a_folder_without_a_tokenizer(no_tokenizer_model, tiny_llama_dir):
    from aplot_rlhf.errors import ModelError
    from aplot_rlhf.models.loader import ROLES, load_tokenizer
    assert set(ROLES) == {"reward", "reward_scorer", "eval", "served", "actor", "reference", "critic_from_actor",
                          "critic_from_reward"}  # a new role joins this test
    for name, role in ROLES.items():
        with pytest.raises(ModelError, match=rf"^{role.flag} {no_tokenizer_model}: no tokenizer files in this folder"):
            load_tokenizer(name, no_tokenizer_model)
        assert len(load_tokenizer(name, tiny_llama_dir)) > 16  # the same folder with its tokenizer loads


def test_train_rm_and_eval_rm_refuse_it_before_any_weights_load(no_tokenizer_model, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                             for i in range(8)))
    for cmd in (["aplot_rlhf.cli.train_rm", "--model_name_or_path", no_tokenizer_model, "--train_data", str(pairs),
                 "--output_dir", str(tmp_path / "run"), "--no-progress"],
                ["aplot_rlhf.cli.eval_rm", "--model", no_tokenizer_model, "--data", str(pairs)]):
        out = subprocess.run([PYTHON, "-m", *cmd], env=python_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2, (cmd[0], out.stderr[-2000:])
        assert "no tokenizer files in this folder" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_the_loader_names_the_flag_and_the_file(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig

    from aplot_rlhf.errors import InputNotFoundError, ModelError
    from aplot_rlhf.models.loader import load_config, load_model, load_tokenizer
    with pytest.raises(InputNotFoundError, match=r"^--actor_model /nonexistent/sft-8b: no such folder"):
        load_tokenizer("actor", "/nonexistent/sft-8b")
    with pytest.raises(InputNotFoundError, match=r"^--reference_model ./missing: no such folder"):
        load_model("reference", "./missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"^--model_name_or_path .*empty: no config.json in this folder"):
        load_model("reward", str(empty))
    (empty / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"a LoRA adapter folder, not a model: pass the merged model folder"):
        load_config("eval", str(empty))
    run = tmp_path / "run"  # what train_rm --lora_rank writes: model/ and model_adapter/ beside it
    shutil.copytree(tiny_llama_dir, run / "model")
    (run / "model_adapter").mkdir()
    (run / "model_adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match=rf"^--model {run}/model_adapter: a LoRA adapter folder, not a model: "
                                         rf"pass --model {run}/model, the merged model"):
        load_tokenizer("eval", str(run / "model_adapter"))  # eval_rm reads the tokenizer first
    cut = tmp_path / "cut"
    shutil.copytree(tiny_llama_dir, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelError, match=rf"^--actor_model {weights}: .* bytes, its header needs .*truncated"):
        load_model("actor", str(cut))
    two = tmp_path / "two_labels"
    shutil.copytree(tiny_llama_dir, two)
    config = AutoConfig.from_pretrained(two, num_labels=2)
    config.architectures = ["LlamaForSequenceClassification"]
    config.save_pretrained(two)
    with pytest.raises(ModelError, match=r"^--reward_model .*two_labels: its classification head has 2 outputs"):
        load_config("reward_scorer", str(two))
    load_config("reward", str(two))  # train_rm puts a fresh one-output head on any backbone


# ------------------------------------------------------------------ setup.py

def test_setup_py_builds_the_package_from_a_clean_copy(tmp_path):
    """The thin setup.py and pyproject.toml together: a wheel built from the tracked files alone carries the
    version aplot_rlhf.__version__ says, every subpackage, and the demo data."""
    import aplot_rlhf
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    src = tmp_path / "src"
    if listed.returncode == 0 and listed.stdout.strip():
        for rel in listed.stdout.splitlines():
            if (REPO / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, src / rel)
    else:  # not a git checkout: everything but what runs leave behind
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv*", "runs", "__pycache__", "*.egg-info"))
    assert (src / "setup.py").is_file()
    version = subprocess.run([PYTHON, "setup.py", "--version"], cwd=src, capture_output=True, text=True, timeout=300)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.split()[-1] == aplot_rlhf.__version__
    built = subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("aplot_rlhf-*.whl"))
    assert [w.name.split("-")[1] for w in wheels] == [aplot_rlhf.__version__]
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for module in ("engine/deepspeed.py", "engine/checkpoint.py", "models/loader.py", "data/sampler.py",
                   "data/export_contract.py", "plan/search.py", "cli/train_rm.py"):
        assert f"aplot_rlhf/{module}" in names, module
    assert any(n.startswith("aplot_rlhf/demo_data/hh-rlhf/") for n in names)
