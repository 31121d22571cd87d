# Issue 24 item 4: CPU seconds of one fwd+bwd in fp32, bf16 weights, and fp32 weights under autocast (see RESULTS.md).
# Needs an HF folder of SmolLM2-135M at /tmp/bf16w/smollm2 (the GGUF de-quantized and saved with save_pretrained).
# CPU seconds (process_time, all threads) of one fwd+bwd: SmolLM2-135M seq-classifier + LoRA r16, 4 seqs x 256
import contextlib
import os
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

torch.manual_seed(0)
def make(dtype):
    m = AutoModelForSequenceClassification.from_pretrained("/tmp/bf16w/smollm2", num_labels=1, dtype=dtype)
    m.config.pad_token_id = 0
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=targets, modules_to_save=["score"]))
    return m.train()
models = {"fp32": make(torch.float32),
          "bf16 weights (DeepSpeed bf16)": make(torch.bfloat16)}
models["fp32 weights + autocast"] = models["fp32"]
ids = torch.randint(1, 40000, (4, 256))
res = {k: [] for k in models}
for rep in range(4):
    for mode, m in models.items():
        ctx = torch.autocast("cpu", torch.bfloat16) if "autocast" in mode else contextlib.nullcontext()
        c, t = time.process_time(), time.perf_counter()
        with ctx:
            out = m(input_ids=ids).logits.float()
        loss = -torch.nn.functional.logsigmoid(out[:2] - out[2:]).mean()
        loss.backward()
        res[mode].append((round(time.process_time() - c, 2), round(time.perf_counter() - t, 2)))
        m.zero_grad()
print("load", os.getloadavg(), "threads", torch.get_num_threads())
for k, v in res.items():
    print(k, "cpu_s,wall_s:", v[1:], flush=True)
