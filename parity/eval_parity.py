"""dreambridge eval against a transformers/torch implementation of the metrics' definitions, at the
real model sizes (random weights: CLIPModel with openai/clip-vit-base-patch32's config, ViTModel
with facebook/dino-vits16's): DINO, CLIP-I, CLIP-T on the same image folders.

    eval_parity.py [DB]
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from common import WORK, drop, record  # noqa: E402
from make_eval_fixtures import transform  # noqa: E402  (the reference transforms in PIL)

DB = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "dreambridge")
OUT = os.path.join(WORK, "eval")
PROMPT = "a photo of a dog on the beach"
IDS = [49406, 320, 1125, 539, 320, 1929, 525, 518, 2117, 49407]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
NET_MEAN, NET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def main():
    torch.manual_seed(1)
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_act="quick_gelu", eos_token_id=49407), vision_config=dict(patch_size=32, hidden_act="quick_gelu"), projection_dim=512)).eval()
    dino = ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16, layer_norm_eps=1e-12), add_pooling_layer=False).eval()
    for name, m in (("clip", clip), ("dino", dino)):
        m.save_pretrained(os.path.join(OUT, name))
    rng = np.random.default_rng(5)
    folders = {"generated": [(320, 240), (200, 300), (256, 259)] * 8, "real": [(512, 512), (300, 400)] * 2}
    files = {}
    for group, sizes in folders.items():
        os.makedirs(os.path.join(OUT, group), exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            y, x = np.mgrid[0:h, 0:w]
            a = np.stack([x * 255 / w, y * 255 / h, (x * y) % 255], -1) + rng.normal(0, 25, (h, w, 3))
            p = os.path.join(OUT, group, f"{i}.png")
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p)
            files.setdefault(group, []).append(p)
    import time

    torch.set_num_threads(os.cpu_count())
    start = time.perf_counter()
    with torch.no_grad():
        feats = {}
        for group, paths in files.items():
            pc = torch.stack([transform(p, 224, 224, CLIP_MEAN, CLIP_STD, False) for p in paths])
            pd = torch.stack([transform(p, 256, 224, NET_MEAN, NET_STD, True) for p in paths])
            feats[group] = (clip.get_image_features(pixel_values=pc).pooler_output, dino(pixel_values=pd).last_hidden_state[:, 0])
        text = clip.get_text_features(input_ids=torch.tensor([IDS + [49407] * (77 - len(IDS))])).pooler_output
    torch_s = time.perf_counter() - start
    n = torch.nn.functional.normalize
    ref = {
        "dino": float((n(feats["generated"][1]) @ n(feats["real"][1]).T).mean()),
        "clip_i": float((n(feats["generated"][0]) @ n(feats["real"][0]).T).mean()),
        "clip_t": float((n(feats["generated"][0]) @ n(text).T).mean()),
    }
    report = os.path.join(OUT, "report.json")
    start = time.perf_counter()
    subprocess.run([DB, "eval", "--generated", os.path.join(OUT, "generated"), "--real", os.path.join(OUT, "real"), "--prompt", PROMPT,
                    "--clip-model", os.path.join(OUT, "clip"), "--dino-model", os.path.join(OUT, "dino"), "--json", report, "--device", "cpu"], check=True)
    ours_s = time.perf_counter() - start
    ours = json.load(open(report))["metrics"]
    drop(OUT)  # the two models (~0.7 GB) and the images: nothing reads them again
    images = sum(len(v) for v in files.values())
    print(f"images scored per second (each image through both models, CPU): dreambridge {images / ours_s:.1f} "
          f"(whole command, model loading included), torch {images / torch_s:.1f} (PIL transforms + models); ratio {torch_s / ours_s:.2f}")
    ok = all([record("eval full size", k, [ref[k]], [ours[k]], 1e-4) for k in ("dino", "clip_i", "clip_t")])
    print(f"\neval parity: {'all pass' if ok else 'FAILURES'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
