r"""Compiles the Pallas GPU kernels to NVIDIA machine code without a GPU, and reports each
kernel's shared memory, registers and stack (where spills go).

  pip install triton        # not a project dependency; Triton 3.9.0 was used
  python -m lmlab.kernels.triton_compile                                # sm_90 (H100), bfloat16
  python -m lmlab.kernels.triton_compile --dtypes=bfloat16,float16,float32 --arch=80

JAX lowers each kernel (forward, dQ, dK/dV; every mask feature on) for an abstract GPU of
--arch (JAX 0.11 and later; older releases lower for sm_90 whatever the flag), this script
takes the Triton IR that JAX hands to XLA, and the pip `triton` package compiles it, through
its own passes and its bundled ptxas, to the cubin whose resource use the table shows. The
Triton inside jaxlib is another build than pip's, so a kernel that compiles here is likely
but not certain to compile on the GPU. The `fits` column compares the shared memory with the
most one block may use on that GPU.

The script hooks a private JAX function (the Triton lowering's entry point); a JAX release
that moves it makes the script stop with one error line.
"""
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags

from lmlab.kernels import pallas, pallas_gpu

jax.config.update('jax_platforms', 'cpu')  # Lowering only: no accelerator is needed.

# Compute capability -> (a device kind of it, shared memory one block may use, in KiB).
GPUS = {80: ('NVIDIA A100-SXM4-80GB', 163), 89: ('NVIDIA L4', 99),
        90: ('NVIDIA H100 80GB HBM3', 227)}

flags.DEFINE_list('dtypes', ['bfloat16'], 'Input dtypes: float32, bfloat16, float16.')
flags.DEFINE_list('head_dims', ['64', '128', '256'],
                  f'Head dims, 1 to {pallas.MAX_HEAD_DIM} (others than powers of two are padded).')
flags.DEFINE_enum('arch', '90', [str(arch) for arch in GPUS],
                  'Compute capability: 80 (A100), 89 (L4), 90 (H100).')
FLAGS = flags.FLAGS


class CompileError(Exception):
  pass


def _lowering_hook():
  """The module whose lower_jaxpr_to_triton_module JAX's pallas_call lowering calls."""
  try:
    from jax._src.pallas.triton import pallas_call_registration as registration
  except ImportError as error:
    raise CompileError(f'this JAX has no Triton lowering to hook ({error})') from None
  hook = getattr(registration, 'lowering', None)
  if not hasattr(hook, 'lower_jaxpr_to_triton_module'):
    raise CompileError('this JAX has no lowering.lower_jaxpr_to_triton_module to hook')
  return hook


def triton_modules(dtype, head_dim: int, device_kind: str):
  """[(kernel name, Triton IR text, num_warps, num_stages)] of the forward and backward."""
  hook = _lowering_hook()
  modules, lower = [], hook.lower_jaxpr_to_triton_module

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

  hook.lower_jaxpr_to_triton_module = recording
  try:
    with pallas_gpu.lowering_target(device_kind):
      text = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(q, k, k).lower(
          lowering_platforms=('cuda',)).as_text()
  finally:
    hook.lower_jaxpr_to_triton_module = lower
  settings = {name: (int(warps), int(stages)) for name, stages, warps in re.findall(
      r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)}
  named = {re.match(r'module @(\w+)', module)[1]: module for module in modules}
  if not named or named.keys() != settings.keys():
    raise CompileError(f'the lowering gave kernels {sorted(named)} with settings for '
                       f'{sorted(settings)}; this JAX lowers differently from what the script '
                       'expects')
  return [(name, module, *settings[name]) for name, module in named.items()]


def compile_module(module: str, num_warps: int, num_stages: int, arch: int) -> dict:
  """Shared memory (bytes), registers and stack bytes of the cubin Triton builds."""
  import triton
  from triton.backends.compiler import GPUTarget
  with tempfile.TemporaryDirectory() as folder:
    source = os.path.join(folder, 'kernel.ttir')
    with open(source, 'w') as f:
      f.write(module)
    kernel = triton.compile(source, target=GPUTarget('cuda', arch, 32), options=dict(
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))
    cubin = os.path.join(folder, 'kernel.cubin')
    with open(cubin, 'wb') as f:
      f.write(kernel.asm['cubin'])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                             'cuobjdump')
    usage = subprocess.run([cuobjdump, '--dump-resource-usage', cubin], capture_output=True,
                           text=True, check=True).stdout
  return {'shared': kernel.metadata.shared, 'registers': int(re.search(r'REG:(\d+)', usage)[1]),
          'stack': int(re.search(r'STACK:(\d+)', usage)[1])}


def _parsed_flags():
  dtypes = []
  for name in FLAGS.dtypes:
    try:
      dtype = jnp.dtype(name)
    except TypeError:
      dtype = None
    if dtype not in pallas.DTYPES:
      raise CompileError(f'--dtypes: {name!r} is not one of float32, bfloat16, float16')
    dtypes.append(dtype)
  head_dims = []
  for text in FLAGS.head_dims:
    if not text.isdigit() or not 1 <= int(text) <= pallas.MAX_HEAD_DIM:
      raise CompileError(f'--head_dims: {text!r} is not an integer from 1 to '
                         f'{pallas.MAX_HEAD_DIM}')
    head_dims.append(int(text))
  if not dtypes or not head_dims:
    raise CompileError('--dtypes and --head_dims need at least one value each')
  return dtypes, head_dims


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])}')
  try:
    import triton
  except ImportError:
    sys.exit('error: this script needs the triton package: pip install triton')
  arch = int(FLAGS.arch)
  device_kind, shared_limit_kib = GPUS[arch]
  failed = False
  try:
    dtypes, head_dims = _parsed_flags()
    print(f'JAX {jax.__version__}, Triton {triton.__version__}, sm_{arch} ({device_kind}, '
          f'{shared_limit_kib} KiB of shared memory a block)\n')
    print('| kernel | dtype | head_dim | warps | stages | shared KiB | fits | registers | '
          'stack bytes |')
    print('|---|---|---:|---:|---:|---:|---|---:|---:|')
    for dtype in dtypes:
      for head_dim in head_dims:
        for name, module, warps, stages in triton_modules(dtype, head_dim, device_kind):
          row = f'| {name} | {dtype.name} | {head_dim} | {warps} | {stages} |'
          try:
            used = compile_module(module, warps, stages, arch)
          except (subprocess.CalledProcessError, RuntimeError) as error:
            message = getattr(error, 'stderr', None) or str(error)
            print(f'{row} failed: {message.strip().splitlines()[0]} | | | |', flush=True)
            failed = True
            continue
          shared_kib = used['shared'] / 1024
          print(f'{row} {shared_kib:.1f} | {"yes" if shared_kib <= shared_limit_kib else "no"} | '
                f'{used["registers"]} | {used["stack"]} |', flush=True)
  except CompileError as error:
    sys.exit(f'error: {error}')
  if failed:
    sys.exit('error: some kernels did not compile (rows marked failed)')


if __name__ == '__main__':
  app.run(main)
