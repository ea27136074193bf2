"""Benchmarks behind the speed claims (docs/claims.md), run by ``q4kdistill bench student|teacher|step``.

  student.py     one student training step (forward + backward + AdamW): tokens/s, share of a
                 matmul ceiling measured in the same run, time per op
  teacher.py     the Q4_K-native teacher against the same forward on dense fp16 weights: prefill
                 time, resident bytes, forward peak, time in matmuls
  step.py        the whole distillation step against the torch + transformers peer, in one run
  peer_torch.py  that peer (the only place torch is imported)
  clock.py       the timer: CUDA events on the GPU, perf_counter on the host

The kernel benchmark is ``kernels.bench`` (``q4kdistill bench kernels``): it belongs to the kernels.
Each benchmark runs at full size on a GPU and at a tiny size on the CPU (``--tiny``), so the CPU
suite runs every line of it.
"""
