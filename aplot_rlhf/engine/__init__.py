"""The run's machinery under the trainers, one subject per module; callers import the module they need.

  distributed  the process group's helpers and our collectives: device, rank 0, barrier, Phase (names the
               phase a failed collective was in), all-gather / all-reduce, broadcast from rank 0, seeds
  deepspeed    everything that calls DeepSpeed, and the only module that imports it: starting the process
               group, config assembly and checks, initialize (trained and frozen), ZeRO-3 gathers,
               offload/reload of states, DeepSpeed's own config parser for dry runs
  checkpoint   atomic, verified, pruned checkpoints (manifests, the Checkpointer, resume selection, RNG)
               and the output folder a run starts in
  export       consolidated Hugging Face folders (plain and LoRA-merged, with the adapter beside them)
               and the per-layer gathered weights the vLLM sync reads
  preemption   stop cleanly on a signal or a stop file: one checkpoint, exit status 75

Works on CUDA (nccl) and on CPU (DeepSpeed's CPU accelerator, gloo). The layers: trainers and rollout
import the engine; the engine imports models (export asks models.lora for merged weights); models never
import the engine (they receive the gather function where they need ZeRO-3 gathers).
"""
