"""Supporting modules of speculative-gpt2: the command line, finding and downloading checkpoints, the tokenizer and
its files, rendering, the lookahead policies, device helpers, CUDA graphs and random checkpoints. The algorithm is
the top-level module `speculative`, the model `gpt2_model`.
"""
