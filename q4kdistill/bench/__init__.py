"""Benchmarks that compare q4kdistill with its peers in one run (`q4kdistill bench ...`): library code
behind the CLI's sub-commands. step.py: the whole distillation step; peer_torch.py: the torch +
transformers peer (the only place torch is imported)."""
