"""Throwaway device probe: decode ms/token of the embedded model, HF generate vs static eager vs
static + CUDA graph, same tokens."""
import time, torch, sys
from fcit_hpc.config import load_config
from fcit_hpc.eval.decode import StaticGreedyDecoder
from fcit_hpc.eval.generate import left_pad
from fcit_hpc.model.build import build_model
from fcit_hpc.runtime import make_runtime

for prec in ("fp32", "bf16"):
    cfg = load_config(None, ["model.name=embedded", "train.device=cuda", f"train.precision={prec}"])
    rt = make_runtime(cfg.train, cfg.federation, 0, 1)
    model, adapter, tok = build_model(cfg, 8, rt)
    g = torch.Generator().manual_seed(3)
    for k in range(8):
        adapter.set(k, torch.randn(adapter.numel, generator=g) * 0.05)
    for B in (1, 8, 64):
        prompts = [f"Copy this number exactly: {i * 37 % 1000} and more words {i}" for i in range(B)]
        alpha = torch.softmax(torch.randn(B, 8, generator=g), -1)
        adapter.set_activation(alpha)
        ids, mask = left_pad([tok.prompt(p) for p in prompts], tok.pad_token_id, rt.device)
        pix = torch.stack([tok.pixels(None) for _ in prompts]).to(rt.device)
        new = 32
        res = {}
        for name in ("hf", "eager", "graph"):
            dec = None if name == "hf" else StaticGreedyDecoder(model, adapter, graphs=name == "graph")
            for rep in range(3):
                torch.cuda.synchronize(); t0 = time.perf_counter()
                if dec is None:
                    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, pixel_values=pix)[:, ids.shape[1]:]
                else:
                    out = dec.generate(ids, mask, new, pixel_values=pix)
                torch.cuda.synchronize(); dt = time.perf_counter() - t0
            res[name] = (dt, out.tolist(), getattr(dec, "stats", None))
        same = res["eager"][1] == res["graph"][1]
        hf_same = all(r[: len(h)] == h for r, h in zip(res["eager"][1], res["hf"][1]))
        print(f"{prec} B={B}: hf {res['hf'][0]*1e3/new:.2f} ms/tok, static eager {res['eager'][0]*1e3/new:.2f}, "
              f"graph {res['graph'][0]*1e3/new:.2f}; graph==eager {same}, eager==hf {hf_same}; "
              f"graph stats {res['graph'][2].captures} captures {res['graph'][2].graph_steps} replays", flush=True)
    adapter.set_activation(None)
