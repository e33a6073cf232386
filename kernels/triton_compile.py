r"""Compiles the Pallas GPU kernels to an NVIDIA binary without a GPU, and reports each kernel's
shared memory, registers and spills.

  pip install triton        # Python 3.12 (Triton 3.9 was used); not a project dependency
  python -m kernels.triton_compile                                # sm_90 (H100), bf16
  python -m kernels.triton_compile --dtypes=bf16,float16,float32 --head_dims=64,128,256

JAX lowers each kernel (forward, dQ, dK/dV; every mask feature on) for an abstract H100, this
script takes the Triton IR that JAX hands to XLA, and the pip `triton` package compiles it for
--arch, through its own passes and its bundled ptxas. The Triton inside jaxlib is another build
than pip's, so a kernel that compiles here is likely but not certain to compile on the GPU;
what it proves is that the IR is valid and the blocks fit: an H100 block has at most 227 KiB
of shared memory, and spills mean the tiles are too large for the warps given.

The script hooks a private JAX function (the Triton lowering's entry point), so a JAX release
that renames it makes it stop with one error line.
"""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TRITON_DEFAULT_FP_FUSION', '1')  # Today's default, without a warning.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from kernels import pallas  # noqa: E402

jax.config.update('jax_platforms', 'cpu')  # Lowering only: no accelerator is needed.

flags.DEFINE_list('dtypes', ['bfloat16'], 'Input dtypes.')
flags.DEFINE_list('head_dims', ['64', '128', '256'], 'Head dims (others are padded).')
flags.DEFINE_integer('arch', 90, 'Compute capability: 80 (A100), 90 (H100), ...')
FLAGS = flags.FLAGS

DEVICE_KINDS = {80: 'NVIDIA A100-SXM4-80GB', 89: 'NVIDIA L4', 90: 'NVIDIA H100 80GB HBM3'}


def triton_modules(dtype, head_dim: int, device_kind: str):
  """[(kernel name, Triton IR text, num_warps, num_stages)] of the forward and backward."""
  from jax._src.pallas.triton import pallas_call_registration as registration
  modules, lower = [], registration.lowering.lower_jaxpr_to_triton_module

  def recording(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  b, t, hq, hkv = 2, 1000, 8, 2
  q = jax.ShapeDtypeStruct((b, t, hq, head_dim), dtype)
  k = jax.ShapeDtypeStruct((b, t, hkv, head_dim), dtype)
  segments = jnp.zeros((b, t), jnp.int32)
  mask = dict(causal=True, sliding_window=256, segment_ids=(segments, segments),
              prefix_len=jnp.array([3, 9]), alibi_slopes=jnp.ones(hq), scale=0.1,
              q_offset=jnp.zeros(b, jnp.int32))

  def loss(q, k, v):
    return pallas.attention(q, k, v, **mask, variant='gpu', interpret=False).sum()

  gpu = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform='gpu')
  registration.lowering.lower_jaxpr_to_triton_module = recording
  try:
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('x',),
                                                                  abstract_device=gpu)):
      text = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(q, k, k).lower(
          lowering_platforms=('cuda',)).as_text()
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower
  settings = re.findall(r'num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
  names = [re.match(r'module @(\w+)', module)[1] for module in modules]
  return [(name, module, int(warps), int(stages))
          for name, module, (stages, warps) in zip(names, modules, settings)]


def compile_module(module: str, num_warps: int, num_stages: int, arch: int) -> dict:
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.backends.nvidia.compiler import get_ptxas
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'kernel.ttir')
    with open(path, 'w') as f:
      f.write(module)
    kernel = triton.compile(path, target=GPUTarget('cuda', arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = os.path.join(folder, 'kernel.ptx')
    with open(ptx, 'w') as f:
      f.write(kernel.asm['ptx'])
    suffix = 'a' if arch >= 90 else ''
    report = subprocess.run([get_ptxas(arch).path, f'-arch=sm_{arch}{suffix}', '-v', ptx,
                             '-o', os.devnull], capture_output=True, text=True, check=True).stderr
  registers = re.search(r'Used (\d+) registers', report)
  spills = re.search(r'(\d+) bytes spill stores', report)
  return {'shared': kernel.metadata.shared, 'registers': int(registers[1]) if registers else None,
          'spill_stores': int(spills[1]) if spills else 0}


def main(argv):
  del argv
  try:
    import triton
  except ImportError:
    sys.exit('error: this script needs the triton package: pip install triton')
  if FLAGS.arch not in DEVICE_KINDS:
    sys.exit(f'error: --arch={FLAGS.arch} is not one of {", ".join(map(str, DEVICE_KINDS))}')
  print(f'JAX {jax.__version__}, Triton {triton.__version__}, sm_{FLAGS.arch}\n')
  print('| kernel | dtype | head_dim | warps | stages | shared KiB | registers | spill bytes |')
  print('|---|---|---:|---:|---:|---:|---:|---:|')
  for dtype in FLAGS.dtypes:
    for head_dim in map(int, FLAGS.head_dims):
      try:
        modules = triton_modules(jnp.dtype(dtype), head_dim, DEVICE_KINDS[FLAGS.arch])
      except AttributeError as error:
        sys.exit(f'error: this JAX has no Triton lowering entry point to hook ({error})')
      for name, module, warps, stages in modules:
        used = compile_module(module, warps, stages, FLAGS.arch)
        print(f'| {name} | {dtype} | {head_dim} | {warps} | {stages} | '
              f'{used["shared"] / 1024:.1f} | {used["registers"]} | {used["spill_stores"]} |',
              flush=True)


if __name__ == '__main__':
  app.run(main)
