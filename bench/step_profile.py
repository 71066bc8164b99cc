"""Host vs device time of bkd's default CUDA Block-KD step (resnet32x4 -> resnet8x4) at one batch size."""
import sys, time
import torch
from bkd_core import BlockKD, data, models, train

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 512
dev = torch.device("cuda")
g = torch.Generator().manual_seed(0)
ds = data.ImageDataset(torch.randint(0, 256, (8192, 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.randint(0, 100, (8192,), generator=g), 100, (0.5,) * 3, (0.25,) * 3, "random")
t, s = models.create("resnet32x4", 100).to(dev), models.create("resnet8x4", 100).to(dev)
m = BlockKD(t, s, sample_input=ds.images[:2].float().to(dev)).to(dev).to(memory_format=torch.channels_last)
cfg = train.TrainConfig(batch_size=batch, lr_base_batch=64).resolved(dev)
opt = train.make_optimizer(m.trainable_parameters(), cfg, dev)
step = train.step_module(m, cfg, dev)
loader = data.BatchLoader(ds, batch, train=True, augmentation=data.Augmentation(4, True), device=dev, channels_last=True)
batches = list(loader)[:8]
def run(n):
    for i in range(n):
        x, y = batches[i % len(batches)]
        with train.autocast(dev, True):
            out = step(x, y)
        opt.zero_grad(set_to_none=True); out.loss.backward(); opt.step()
run(8); torch.cuda.synchronize()
t0 = time.perf_counter(); run(20); host = (time.perf_counter() - t0) / 20; torch.cuda.synchronize(); wall = (time.perf_counter() - t0) / 20
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
torch.cuda.synchronize(); e0.record(); run(20); e1.record(); torch.cuda.synchronize()
print(f"b{batch}: host issue {host*1e3:.1f} ms/step, wall {wall*1e3:.1f} ms/step, events {e0.elapsed_time(e1)/20:.1f} ms/step", flush=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    run(5); torch.cuda.synchronize()
ka = prof.key_averages()
gpu = sum(k.self_device_time_total for k in ka) / 5 / 1e3
print(f"b{batch}: GPU kernel time {gpu:.1f} ms/step; top kernels:")
print(ka.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
