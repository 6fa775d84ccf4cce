"""Every method at tiny size, with each text add-on and each ablation switch that changes which parameters
train: the configurations the DDP checks run (single-process gradient coverage in the default suite, two
gloo processes in `test_ddp_all_methods`). Imported by tests and by the spawned DDP workers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from textseg_cli.runs.config import build_config
from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method, list_methods

PATCH3, PATCH2 = [32, 32, 16], [32, 32]
TINY3 = ["method.backbone.n_filters=4"]


@dataclass
class Spec:
    id: str
    method: str
    dim: int = 3
    sets: list[str] = field(default_factory=list)
    emb: str | None = None  # "clip" or "bert": which embedding file the method reads


def _specs() -> list[Spec]:
    specs: list[Spec] = []
    special = {
        "uamt": [Spec("uamt", "uamt", sets=TINY3 + ["method.mc_passes=2"])],
        "bcp": [Spec("bcp", "bcp", sets=TINY3 + ["method.pretrain_iterations=1"])],  # step 2 self-trains
        "text-semiseg": [Spec(f"text-semiseg{n}", "text-semiseg", sets=TINY3 + ["method.dca_start=0", *s], emb="clip")
                         for n, s in [("", []), ("-no-tmr", ["method.tmr=false"]), ("-no-csa", ["method.csa=false"]),
                                      ("-no-dca", ["method.dca=false"]), ("-tmr-official", ["method.tmr=official"]),
                                      ("-repeat", ["method.text_fusion=repeat"])]],
        "vclipseg": [Spec(f"vclipseg{n}", "vclipseg", sets=TINY3 + s, emb="clip")
                     for n, s in [("", []), ("-no-vwpm", ["method.vwpm=false"]), ("-no-vtcm", ["method.vtcm=false"])]],
        "llm-segnet": [Spec("llm-segnet", "llm-segnet", sets=TINY3, emb="bert"),
                       Spec("llm-segnet-unet3d", "llm-segnet", emb="bert",
                            sets=["method.backbone_model=unet3d", "method.backbone_unet3d={norm: instance, n_filters: 4}"])],
        "tgcnet": [Spec(f"tgcnet{n}", "tgcnet", dim=2, sets=s)
                   for n, s in [("", []), ("-sse-off", ['method.sse="off"']), ("-sse-cnn", ['method.sse="cnn-only"']),
                                ("-clip-qv", ['method.clip_finetune="qv"']),
                                ("-clip-full", ['method.clip_finetune="full"']),
                                ("-date-main", ['method.date="main-only"']), ("-date-aux", ['method.date="aux-only"']),
                                ("-vlcm-none", ['method.vlcm="none"']), ("-vlcm-single", ['method.vlcm="single"']),
                                ("-vlcm-bi", ['method.vlcm="bi"'])]],
    }
    for name, cls in list_methods().items():
        if name in special:
            specs += special[name]
        elif name == "unet2d" or cls.dims == (2,):
            specs.append(Spec(name, name, dim=2))
        else:
            specs.append(Spec(name, name, sets=list(TINY3)))
    # the "+Text" add-on (TMR and/or CSA) around every V-Net method that accepts it
    for base in ("sup", "mcnet", "uamt", "dtc", "mcf", "bcp", "mlrp", "cps", "ad-mt", "crossmatch"):  # urpc: a U-Net
        base_sets = next(s.sets for s in specs if s.id == base)
        for addon in ("tmr", "csa", "tmr+csa"):
            specs.append(Spec(f"{base}+{addon}", base, sets=base_sets + [f"method.text_addon={addon}"], emb="clip"))
    return specs


SPECS = _specs()


def write_inputs(folder: Path) -> dict[str, str]:
    """Offline inputs the specs need: CLIP class-prompt and BERT embedding files, DATE's aux prompts."""
    from textseg_cli.text.describe import AUX_FILE, AUX_FORMAT
    from textseg_cli.text.embeddings import save_embeddings

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    clip = save_embeddings(folder / "clip.safetensors", {"embeddings": F.normalize(torch.randn(2, 64, generator=g), dim=-1)},
                           {"encoder": "clip", "texts": ["A pixel of a background.", "A pixel of a liver."]})
    bert = save_embeddings(folder / "bert.safetensors", {"embeddings": torch.randn(15, 32, generator=g)},
                           {"encoder": "bert", "texts": [f"description {i}" for i in range(15)]})
    aux = {"format": AUX_FORMAT, "aux_texts": {f"c{i}": f"round bright region {i}" for i in range(8)}}
    (folder / AUX_FILE).write_text(json.dumps(aux))
    return {"clip": str(clip), "bert": str(bert), "root": str(folder)}


def build(spec: Spec, inputs: dict[str, str]):
    sets = list(spec.sets)
    if spec.emb:
        sets.append(f"method.text.embeddings={inputs[spec.emb]}")
    if spec.dim == 2:
        cfg = build_config(spec.method, "synthetic2d", 2, PATCH2, sets=sets)
    else:
        cfg = build_config(spec.method, "synthetic", 3, PATCH3, sets=sets)
    ctx = dict(class_names=["background", "liver"], dataset_name="synthetic", data_root=inputs["root"],
               patch_size=cfg["data"]["patch_size"], quiet_warnings=True)
    return build_method(spec.method, cfg, 1, 2, spec.dim, **ctx)


def batch(spec: Spec, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    shape = PATCH3 if spec.dim == 3 else PATCH2
    lab = torch.zeros(2, *shape, dtype=torch.long)
    lab[:, 8:20, 10:22, ...] = 1
    img = torch.rand(2, 1, *shape, generator=g) * 0.5 + 0.4 * lab.unsqueeze(1)
    img_u = torch.rand(2, 1, *shape, generator=g)
    if spec.dim == 2:  # 2D referring data: one text per image, aux prompts by case id
        return Batch(img, lab, img_u[:0], ids_l=["c0", "c1"], text_l=["liver on the left", "a liver"])
    return Batch(img, lab, img_u, ids_l=["c0", "c1"], ids_u=["c2", "c3"])


def ctx(it: int, rank: int = 0, world_size: int = 1) -> StepContext:
    return StepContext(it, 100, torch.device("cpu"), extra={"rank": rank, "world_size": world_size})


def params_without_grad(method) -> list[str]:
    """Trainable parameters (those the optimiser gets) that the last backward left without a gradient."""
    trainable = {id(p) for g in method.param_groups() for p in g["params"]}
    return [n for n, p in method.named_parameters() if id(p) in trainable and p.grad is None]


def ddp_worker(rank: int, world_size: int, init_file: str, folder: str, ids: list[str], out_dir: str) -> None:
    """One gloo process: every spec in `ids` trains 2 steps under DDP as the trainer wraps it
    (`find_unused_parameters=False`); writes {id: error or None, "<id>:checksum": weight checksum}."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from textseg_cli.engine.loop import _StepModule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    inputs = {"clip": str(Path(folder) / "clip.safetensors"), "bert": str(Path(folder) / "bert.safetensors"),
              "root": folder}
    results: dict[str, object] = {}
    try:
        for spec in [s for s in SPECS if s.id in ids]:
            try:
                torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts them)
                method = build(spec, inputs)
                method.train()
                step = DDP(_StepModule(method), find_unused_parameters=False)
                opt = torch.optim.SGD([p for g in method.param_groups() for p in g["params"]], lr=1e-3)
                for it in range(2):
                    out = step(batch(spec, seed=10 * rank + it), ctx(it, rank, world_size))
                    opt.zero_grad(set_to_none=True)
                    out["loss"].backward()
                    opt.step()
                    method.on_after_optimizer_step(ctx(it, rank, world_size))
                results[spec.id] = None
                results[spec.id + ":checksum"] = float(sum(p.detach().double().sum() for p in method.parameters()
                                                           if p.requires_grad))
            except Exception as exc:  # noqa: BLE001 - reported per spec; the other specs still run
                results[spec.id] = f"{type(exc).__name__}: {str(exc)[:300]}"
                dist.barrier()  # a failed collective leaves ranks out of step: meet before the next spec
    finally:
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def decision_worker(rank: int, world_size: int, init_file: str, folder: str, out_dir: str) -> None:
    """One gloo process: MCF's good student and Text-SemiSeg's better/worse DCA decoders chosen from losses
    that favour a different network on each rank; writes the choices this rank made."""
    import torch.distributed as dist

    import textseg_cli.methods.mcf as mcf_mod
    import textseg_cli.methods.text_semiseg as ts_mod

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    inputs = {"clip": str(Path(folder) / "clip.safetensors"), "bert": str(Path(folder) / "bert.safetensors"),
              "root": folder}
    # local losses: rank 0 prefers network/decoder 0, rank 1 network/decoder 1; their mean prefers 1
    local = {0: [0.1, 0.2], 1: [0.5, 0.3]}[rank]
    try:
        calls = {"n": 0}

        def fake_dice(probs, *a, **k):  # MCF calls it for the V-Net, then for the ResNet
            value = local[calls["n"] % 2]
            calls["n"] += 1
            return probs.sum() * 0 + value

        mcf_mod.dice_loss = fake_dice
        spec = next(s for s in SPECS if s.id == "mcf")
        out = build(spec, inputs).training_step(batch(spec, seed=rank), ctx(0, rank, world_size))
        choices = {"mcf_good_is_resnet": float(out["good_student_is_resnet"])}

        spec = next(s for s in SPECS if s.id == "text-semiseg")
        m = build(spec, inputs)
        m.use_csa = False
        b = batch(spec, seed=rank)
        shape = (b.image_l.shape[0], 2, *b.image_l.shape[2:])
        m.forward_decoders = lambda x, text, *a: ([torch.full(shape, 0.0), torch.full(shape, 1.0)], None)
        seen: dict[str, int] = {}
        real_mix = ts_mod.dca_mix

        def recording_mix(xl, yl, xu, pl):
            seen["better"] = int(pl.flatten()[0])
            return real_mix(xl, yl, xu, pl)

        ts_mod.dca_mix = recording_mix
        pls = [torch.zeros_like(b.label_l), torch.ones_like(b.label_l)]  # decoder i's pseudo-labels are all i

        def seg(logits, labels):
            seen["worse"] = int(logits.flatten()[0])
            return logits.sum() * 0

        m._dca(b, [torch.tensor(v) for v in local], pls, m._text(), seg)
        choices.update(dca_better=seen["better"], dca_worse=seen["worse"])
        (Path(out_dir) / f"decisions{rank}.json").write_text(json.dumps(choices))
    finally:
        dist.destroy_process_group()
