r"""Smaller and faster models from one trained decoder: weight-only quantisation after training
(PTQ) and during it (QAT), pruning with and without a recovery fine-tune, a distilled student
of half the width, and decoding speed with quantised weights and with speculative decoding.

  python experiments/model_compression.py     # quick, 4 seeds: about 9 minutes on 2 CPUs
  python experiments/model_compression.py --seeds=1 --steps=100
  python experiments/model_compression.py --scale=full   # a GPU or TPU

Runs per seed (the common base of experiments/grid.py, its MLP rounded up to a multiple of 64
units so that the quantisation groups divide every input dimension):
  float            the base, trained; then, without training: every PTQ spec
                   (models/weight_quant.py), one-shot pruning (models/pruning.py) at 50%
                   unstructured and 2:4, each by magnitude and by Wanda's score (4 training
                   batches of calibration), and greedy decoding speed in float, int8 and int4
  qat              the base trained from the start with fake int4 (per channel, where PTQ
                   costs most), then quantised: PTQ int4's bits, trained knowing of them
  pruned50 / pruned2of4
                   the float run pruned by magnitude, then fine-tuned a third of its steps at
                   its learning rate with the masks fixed (recovery)
  float_longer     the float run fine-tuned the same steps unpruned: recovery's steps also
                   train the model further, and this is what they would give alone (and
                   its PTQ int4)
  qat_finetune     the float run fine-tuned the same steps with fake int4, then quantised
                   (QAT as a short stage after training, as LLM-QAT does): against
                   float_longer's PTQ int4
  student          half the width, trained by distillation from the float run (T=2, weight
                   0.5); it also drafts for the float run in speculative decoding
  student_alone    the same shape trained on the data alone: what distillation adds

What the papers claim: 8-bit weights cost nothing measurable and 4-bit group-wise weights
little, smaller groups less (GPTQ, Frantar et al. 2023; AWQ, Lin et al. 2024; LLM.int8(),
Dettmers et al. 2022: at small scales, before outlier features emerge). 2:4 sparsity costs
more than 50% unstructured at the same count (Wanda, Sun et al. 2024; SparseGPT), Wanda's
score beats magnitude on LLMs, and a short fine-tune recovers much of the loss. A distilled
student beats the same student trained alone (Hinton et al. 2015; DistilBERT). Speculative
decoding keeps the target's output exactly and is faster when the draft is much cheaper than
the target and often agrees with it (Leviathan et al. 2023; Chen et al. 2023).
Writes to --out: results.csv, results.md, loss_by_setting.png.

(Not named compression.py: run as a script, that file would shadow the standard library's
`compression` package of Python 3.14, which JAX imports.)
"""
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from lmlab.data import batches
from lmlab.experiments import grid, report
from lmlab.models import pruning, weight_quant
from lmlab.models.generation import SamplingConfig, make_generate
from lmlab.models.speculative import make_speculative_generate
from lmlab.training import run as run_lib

METHODS = ('float', 'qat', 'pruned50', 'pruned2of4', 'float_longer', 'qat_finetune', 'student',
           'student_alone')
QAT_SPEC = 'int4'
PRUNINGS = {'unstructured 50%': 'unstructured:0.5', '2:4': '2:4'}
DECODE_TOKENS = 128
CALIBRATION_BATCHES = 4

flags.DEFINE_list('compressions', list(METHODS), f'Runs per seed ({", ".join(METHODS)}).')
flags.DEFINE_integer('draft_tokens', 4, 'Tokens the student drafts per round (gamma).')


def quant_specs(config) -> list[str]:
  """int8 and int4 per channel and in the groups that divide every input dimension."""
  groups = [f':g{g}' for g in (128, 64, 32) if config.d_model % g == 0 and config.ffn_dim % g == 0]
  return ['int8', 'int4', *(f'int4{g}' for g in groups), f'int4{(groups or [""])[-1]}:asym']


def quantized(graphdef, params, spec: str):
  """(graphdef, params) of the model with its kernels quantised as spec says."""
  model = nnx.clone(nnx.merge(graphdef, params))
  weight_quant.quantize_kernels(model, weight_quant.parse_spec(spec, 'quantize'))
  model.config = dataclasses.replace(model.config, quantize=spec, qat='')
  return nnx.split(model)


def pruned(graphdef, params, spec: str, norms=None):
  model = nnx.clone(nnx.merge(graphdef, params))
  pruning.prune(model, pruning.parse_spec(spec), norms)
  model.config = dataclasses.replace(model.config, pruned=True)
  return nnx.split(model)


def state_bytes(params) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def tokens_per_second(run) -> float:
  """DECODE_TOKENS over the median of 3 timed calls of run(), after one that compiles."""
  run()
  seconds = []
  for _ in range(3):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
  return DECODE_TOKENS / statistics.median(seconds)


def greedy_speed(graphdef, params, prompt_1t, n_valid: int) -> float:
  generate = make_generate(graphdef, SamplingConfig(max_new_tokens=DECODE_TOKENS,
                                                    temperature=0.0), end_token=-1,
                           n_valid=n_valid)
  key = jax.random.key(0)
  return tokens_per_second(lambda: generate(params, prompt_1t, key).block_until_ready())


def prompt_of(trained: grid.Trained):
  return trained.val_batch(batch_size=1)['inputs'][:, :8]


def measure_float(trained: grid.Trained) -> dict:
  """PTQ and one-shot pruning of the trained model, and its decoding speed."""
  graphdef, params, seq_len = trained.graphdef, trained.params, trained.setup.train.seq_len
  n_valid = trained.model.vocab_size
  record = {'bytes': state_bytes(params),
            'decode_tps': greedy_speed(graphdef, params, prompt_of(trained), n_valid)}
  for spec in quant_specs(trained.model):
    q_graphdef, q_params = quantized(graphdef, params, spec)
    record[f'ptq {spec}'] = trained.eval_loss(q_params, seq_len, graphdef=q_graphdef)
    record[f'ptq {spec} bytes'] = state_bytes(q_params)
    if spec in ('int8', 'int4'):
      record[f'ptq {spec} decode_tps'] = greedy_speed(q_graphdef, q_params, prompt_of(trained),
                                                      n_valid)
  train = trained.setup.train
  calibration = [{k: jnp.asarray(v) for k, v in batches.train_batch(
      trained.train_tokens, seed=train.seed, step=step, batch_size=train.batch_size,
      seq_len=seq_len, end_token=trained.end_token).items()}
      for step in range(CALIBRATION_BATCHES)]
  norms = pruning.input_norms(nnx.clone(nnx.merge(graphdef, params)),
                              lambda model, batch: model(batch['inputs']), calibration)
  for name, spec in PRUNINGS.items():
    for score, score_norms in (('magnitude', None), ('wanda', norms)):
      p_graphdef, p_params = pruned(graphdef, params, spec, score_norms)
      record[f'prune {name} {score}'] = trained.eval_loss(p_params, seq_len, graphdef=p_graphdef)
  return record


def measure_qat(trained: grid.Trained) -> dict:
  q_graphdef, q_params = quantized(trained.graphdef, trained.params, QAT_SPEC)
  return {'quantized_loss': trained.eval_loss(q_params, trained.setup.train.seq_len,
                                              graphdef=q_graphdef),
          'bytes': state_bytes(q_params)}


def run():
  settings = grid.Settings('model_compression', {'quick': dict(seeds=4)})
  methods = settings.values('compressions', choices=METHODS)
  axes = {'method': methods}

  def rounded(setup):
    return setup.with_model(ffn_dim=-(-setup.model.ffn_dim // 64) * 64)

  def teacher_workdir(cell, setup):
    teacher_cell = {**cell, 'method': 'float'}
    return grid.workdir_of(settings.out, teacher_cell, rounded(settings.base_setup(
        teacher_cell, setup.train.seed)))

  def configure(cell, setup):
    setup, method = rounded(setup), cell['method']
    if method == 'qat':
      return setup.with_model(qat=QAT_SPEC)
    if method in ('pruned50', 'pruned2of4', 'float_longer', 'qat_finetune'):
      teacher = teacher_workdir(cell, setup)
      spec = PRUNINGS.get({'pruned50': 'unstructured 50%', 'pruned2of4': '2:4'}.get(method))

      def init_params(_):
        loaded = run_lib.restore(teacher)
        return loaded.params if spec is None else pruned(loaded.graphdef, loaded.params,
                                                         spec)[1]

      recovery = max(1, setup.train.steps // 3)
      if method == 'qat_finetune':
        setup = setup.with_model(qat=QAT_SPEC)
      return dataclasses.replace(
          setup.with_model(pruned=spec is not None).with_train(steps=recovery).with_optimizer(
              warmup_steps=min(10, recovery - 1), total_steps=recovery),
          init_params=init_params,
          init_description=f'{teacher}' + (f' pruned {spec} by magnitude' if spec else ''))
    if method in ('student', 'student_alone'):
      student = setup.with_model(d_model=setup.model.d_model // 2,
                                 ffn_dim=setup.model.ffn_dim // 2)
      if method == 'student_alone':
        return student
      return student.with_train(objective='distill', teacher=teacher_workdir(cell, setup),
                                distill_temperature=2.0, distill_weight=0.5)
    return setup

  def measure(trained):
    if trained.params is None:
      return {}
    if trained.setup.model.qat:
      return measure_qat(trained)
    if trained.setup.train.objective == 'distill':
      return measure_student(trained)
    if trained.setup.init_params and not trained.setup.model.pruned:
      return measure_qat(trained)  # float_longer: its PTQ; the same measure as QAT's
    if trained.setup.init_params or trained.setup.model.d_model != settings.value('d_model'):
      return {'bytes': state_bytes(trained.params)}
    return measure_float(trained)

  def measure_student(trained):
    loaded = run_lib.restore(trained.setup.train.teacher)
    teacher, teacher_graphdef = loaded.params, loaded.graphdef
    prompt = prompt_of(trained)
    sampling = SamplingConfig(max_new_tokens=DECODE_TOKENS, temperature=0.0)
    gamma = flags.FLAGS.draft_tokens
    generate = make_speculative_generate(teacher_graphdef, trained.graphdef, sampling,
                                         gamma=gamma, end_token=-1,
                                         n_valid=trained.model.vocab_size)
    key = jax.random.key(0)
    _, rounds, accepted = generate(teacher, trained.params, prompt, key)
    return {'bytes': state_bytes(trained.params),
            'speculative_tps': tokens_per_second(
                lambda: generate(teacher, trained.params, prompt, key)[0].block_until_ready()),
            'accepted': int(accepted) / (int(rounds) * gamma),
            'teacher_tps': greedy_speed(teacher_graphdef, teacher, prompt,
                                        trained.model.vocab_size)}

  records = grid.run(settings, settings.cells(axes), configure, measure=measure)
  rows = table_rows(records)
  plots = [report.bar_plot_of(settings, rows, ['setting'], 'val_loss',
                              ylabel='validation loss (nats/token)',
                              title='Validation loss of each compression',
                              file='loss_by_setting.png')]
  report.write(
      settings, rows, title='Quantisation, pruning, distillation and speculative decoding',
      intro='One row per setting; PTQ and one-shot pruning rows are the float run changed '
            'after training. Bytes: the whole model state (embeddings and norms stay float; '
            'pruned models keep dense kernels plus their masks). Decode: greedy tokens per '
            f'second, batch 1, {DECODE_TOKENS} tokens after an 8-token prompt, median of 3.',
      axes=['setting'], plots=plots,
      columns=[report.Column('val_loss', 'validation loss'),
               report.Column('change', 'change from float'),
               report.Column('bytes', 'state bytes', 0),
               report.Column('decode_tps', 'decode tokens/s', 0),
               report.Column('accepted', 'drafts accepted')])


def table_rows(records: list[dict]) -> list[dict]:
  """One row per (setting, seed) from the runs' records."""
  floats = {r['seed']: r for r in records if r['method'] == 'float'}
  rows = []

  def add(setting, record, loss, **extra):
    base = floats.get(record['seed'], {}).get('final_eval_loss')
    rows.append({'setting': setting, 'seed': record['seed'], 'val_loss': loss,
                 'change': None if base is None or loss is None else loss - base, **extra})

  for record in records:
    method, loss = record['method'], record.get('final_eval_loss')
    if method == 'float':
      add('float', record, loss, bytes=record.get('bytes'), decode_tps=record.get('decode_tps'))
      for key in [k for k in record if k.startswith('ptq ') and k.count(' ') == 1]:
        add(key, record, record[key], bytes=record.get(f'{key} bytes'),
            decode_tps=record.get(f'{key} decode_tps'))
      for key in [k for k in record if k.startswith('prune ')]:
        add(key + ', one-shot', record, record[key])
    elif method == 'qat':
      add(f'qat {QAT_SPEC} from the start, quantised', record, record.get('quantized_loss'),
          bytes=record.get('bytes'))
    elif method == 'qat_finetune':
      add(f'float + the recovery steps with qat {QAT_SPEC}, quantised', record,
          record.get('quantized_loss'), bytes=record.get('bytes'))
    elif method in ('pruned50', 'pruned2of4'):
      name = {'pruned50': 'unstructured 50%', 'pruned2of4': '2:4'}[method]
      add(f'prune {name} magnitude + recovery', record, loss)
    elif method == 'float_longer':
      add('float + the recovery steps, unpruned', record, loss)
      add(f'float + the recovery steps, ptq {QAT_SPEC}', record, record.get('quantized_loss'),
          bytes=record.get('bytes'))
    elif method == 'student':
      add('student d/2, distilled', record, loss, bytes=record.get('bytes'))
      add('speculative: student drafts', record, None, decode_tps=record.get(
          'speculative_tps'), accepted=record.get('accepted'))
      add('float (the target, same call)', record, None,
          decode_tps=record.get('teacher_tps'))
    else:
      add('student d/2, alone', record, loss, bytes=record.get('bytes'))
  return rows


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
