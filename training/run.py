"""What main.py's modes do, as functions that main.py, experiments/ and tests share: restore a
run's latest checkpoint, load a Hugging Face folder with its tokenizer, start from another
run's parameters, evaluate, sample, convert between the two formats, train a tokenizer.
"""
import dataclasses
import functools
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.data import batches as batches_lib
from lmlab.data import corpus as corpus_lib
from lmlab.data import tokenizer as tokenizer_lib
from lmlab.data import gguf_tokenizer
from lmlab.data.chat_template import ChatTemplate, render
from lmlab.data.errors import DataError
from lmlab.models import hf, lora, pruning, quantize, weight_quant
from lmlab.models.hf import adapters, gguf_files
from lmlab.models.config import ModelConfig, preset, with_overrides
from lmlab.models.errors import ConfigError
from lmlab.models.generation import SamplingConfig, make_generate
from lmlab.models.hf.architecture import RUN_FIELDS
from lmlab.models.registry import without_value_head
from lmlab.models.speculative import make_speculative_generate
from lmlab.models.sharding import VOCAB, logical_axes
from lmlab.training import eval_tasks, objectives, scoring
from lmlab.training import steps as steps_lib
from lmlab.training.checkpoint import Checkpoints
from lmlab.training.config import TrainConfig, default_objective
from lmlab.training.language_modeling import (check_same_vocabulary, end_token, evaluate_tokens,
                                              load_run_tokenizer, resolve_vocab, tokenize,
                                              tokenizer_dir)
from lmlab.training.optimizer import OptimizerConfig
from lmlab.training.restored import Loaded, restore
from lmlab.training.workdir import (WorkdirError, config_path, locked, read_config,
                                    record_config)


def default_workdir(model: str, hf_checkpoint: str | None = None) -> str:
  if hf_checkpoint:
    return os.path.join('runs', 'hf-' + os.path.basename(os.path.normpath(hf_checkpoint)))
  return os.path.join('runs', model)


def load_hf(path: str, overrides: list[str], run: TrainConfig, tokenizer: str | None = None):
  """(model, run config) of a Hugging Face folder: overrides may set only RUN_FIELDS; the
  tokenizer is its tokenizer.json (BERT: vocab.txt) unless given."""
  _, config = hf.read_config(path)
  changed = with_overrides(config, overrides)
  fixed = [f.name for f in dataclasses.fields(config)
           if f.name not in RUN_FIELDS and getattr(changed, f.name) != getattr(config, f.name)]
  if fixed:
    raise ConfigError(f'--set {fixed[0]} would change the checkpoint\'s architecture; with '
                      f'--hf_checkpoint only {", ".join(RUN_FIELDS)} can be set')
  if tokenizer is None and gguf_files.is_gguf(path):
    tokenizer = path  # Its metadata holds the vocabulary.
  elif tokenizer is None:
    # BERT's WordPiece vocabulary is its vocab.txt (our reader of tokenizer.json is BPE's).
    name = 'vocab.txt' if config.family == 'encoder' else 'tokenizer.json'
    tokenizer = os.path.join(path, name)
    if not os.path.exists(tokenizer):
      raise DataError(f'{path} has no {name}; pass --tokenizer')
  model = hf.load(path, **{name: getattr(changed, name) for name in RUN_FIELDS})
  return model, dataclasses.replace(run, tokenizer=tokenizer,
                                    objective=run.objective or default_objective(config))


def load(run: TrainConfig, hf_checkpoint: str | None, overrides: list[str],
         tokenizer: str | None = None) -> Loaded:
  """The Hugging Face folder when one is given (run describes the data to evaluate it on),
  else the latest checkpoint of run.workdir."""
  if not hf_checkpoint:
    return restore(run.workdir)
  model, run = load_hf(hf_checkpoint, overrides, run, tokenizer)
  graphdef, params = nnx.split(model)
  return Loaded(graphdef, params, load_run_tokenizer(run), run, hf_checkpoint,
                end_token=hf.end_token_id(hf_checkpoint))


def init_from(workdir: str, overrides: list[str]):
  """(model config, tokenizer spec, init_params) to start a run from another run's latest
  parameters: its config with overrides on top, its tokenizer, and its parameters wherever
  the new model has one of the same path and shape (a classifier keeps the pre-trained
  encoder and gets a fresh head; LoRA adapters start fresh beside the pre-trained kernels,
  which a QLoRA model quantises).
  Where only the vocabulary axis grew (a chat template's tokens joined the tokenizer), the
  old tokens' rows are carried over and the new ones keep their fresh initialisation."""
  loaded = restore(workdir)
  source = dict(nnx.to_flat_state(loaded.params))
  path = tokenizer_lib.source_file(loaded.run.tokenizer, tokenizer_dir(workdir))

  def carried(name, value):
    old = source.get(name)
    if old is None or old.ndim != value.ndim:
      return value
    if old.shape == value.shape:  # A copy: a train step donates (deletes) what it is given.
      return value.replace(jnp.array(old[...], copy=True))
    axes = logical_axes(value) or ()
    changed = [i for i, (was, now) in enumerate(zip(old.shape, value.shape)) if was != now]
    if (len(changed) != 1 or axes[changed[0]:changed[0] + 1] != (VOCAB,)
        or old.shape[changed[0]] > value.shape[changed[0]]):
      return value
    rows = tuple(slice(0, size) for size in old.shape)
    return value.replace(jnp.asarray(value[...]).at[rows].set(old[...]))

  def copied(params):
    return nnx.from_flat_state([(name, carried(name, value))
                                for name, value in nnx.to_flat_state(params)])

  model_config = with_overrides(read_config(workdir)['model'], overrides).validate()

  def init_params(params):
    params = copied(params)
    if not model_config.lora_quantize:
      return params
    # QLoRA: each quantised kernel holds the pre-trained one at its path, quantised.
    return quantize.filled_from(params, {name: value[...] for name, value in source.items()},
                                scheme=model_config.lora_quantize,
                                block=model_config.lora_quantize_block)
  return model_config, path or loaded.run.tokenizer, init_params


def evaluate(loaded: Loaded, data: str | None = None, eval_batches: int | None = None,
             make_eval_step=steps_lib.make_eval_step) -> dict:
  """The run's own eval metrics; for a next-token run, the loss and perplexity on the files of
  `data` (default: the run's validation split) over eval_batches (default: the run's), each
  batch's loss from make_eval_step(graphdef)(params, batch)."""
  model_config = nnx.merge(loaded.graphdef, loaded.params).config
  run = loaded.run
  if run.objective != 'lm':
    if run.objective in ('bert', 'roberta') and not model_config.mlm_head:
      raise ConfigError(f'{loaded.source} has no masked-LM head to evaluate; --mode=eval of an '
                        'encoder needs BertForMaskedLM, BertForPreTraining or RobertaForMaskedLM')
    task = objectives.by_name(run.objective)(run, model_config)
    task.load_data()
    return task.evaluate(loaded.graphdef, loaded.params)
  if model_config.family != 'decoder':
    raise ConfigError(f'--mode=eval measures next-token loss; a family={model_config.family} '
                      'model is evaluated from the workdir of its training run')
  if data:
    splits, name = {'eval': _documents(data)}, 'eval'
  else:
    splits, name = corpus_lib.split_corpus(run.data, run.val_fraction), 'val'
  with tempfile.TemporaryDirectory() as scratch:  # A token cache made here is not kept.
    tokens = tokenize(run, loaded.tokenizer, splits, scratch=scratch)[name]
    batches_lib.check_length(tokens, run.seq_len, 'evaluation')
    loss = evaluate_tokens(make_eval_step(loaded.graphdef), loaded.params, tokens,
                           batch_size=run.micro_batch_size, seq_len=run.seq_len,
                           max_batches=eval_batches or run.eval_batches,
                           end_token=end_token(run, loaded.tokenizer))
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700))}


def _documents(data: str) -> list[corpus_lib.Document]:
  """The non-empty files of --data, each a document."""
  _, paths = corpus_lib.files_of(data)
  documents = [corpus_lib.Document(p, p) for p in paths if os.path.getsize(p)]
  if not documents:
    raise DataError(f'--data={data!r} has no non-empty files')
  return documents


def evaluate_tasks(loaded: Loaded, spec: str, data: str | None = None,
                   eval_batches: int | None = None) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} of the built-in tasks of `spec` (training/eval_tasks.py); the
  evaluation text is the files of `data` (default: the run's validation split), eval_batches
  (default: the run's) micro-batches of it."""
  scoring.check_decoder(nnx.merge(loaded.graphdef, loaded.params).config, '--tasks')
  suite = eval_tasks.for_run(spec, loaded.run, loaded.tokenizer,
                             documents=_documents(data) if data else None,
                             eval_batches=eval_batches)
  return suite.run(loaded.graphdef, loaded.params)


# One compiled generator per model and settings, reused by each sample and chat turn.
generator = functools.lru_cache(maxsize=4)(make_generate)


def _check_samples(config):
  if config.family != 'decoder':
    raise ConfigError(f'--mode=generate samples from decoders, not family={config.family}')
  if config.n_labels:
    raise ConfigError(f'this model scores sequences (n_labels={config.n_labels}, a reward '
                      'model): it has no LM head to sample from')


def text_until(tokenizer, new_tokens: list[int], eot: int, after: list[int] = ()) -> str:
  """The text of new_tokens up to (without) eot, as it reads after the tokens `after`: the
  decoders of SentencePiece vocabularies drop the space that begins a text, which after a
  prompt is part of the continuation."""
  if eot in new_tokens:
    new_tokens = new_tokens[:new_tokens.index(eot)]
  alone = tokenizer.decode(new_tokens, errors='replace')
  if not after:
    return alone
  head = tokenizer.decode(list(after), errors='replace')
  whole = tokenizer.decode(list(after) + new_tokens, errors='replace')
  return whole[len(head):] if whole.startswith(head) else alone


def _continuations(graphdef, params, tokenizer, prompt_tokens: list[int], sampling, *,
                   seed: int, eot: int, num_samples: int = 1,
                   after: list[int] = ()) -> list[str]:
  """num_samples texts sampled after prompt_tokens, each up to (without) eot and read after
  the tokens `after` (text_until); several share the prompt's KV cache
  (models/shared_prefix.py)."""
  _check_samples(nnx.merge(graphdef, params).config)
  generate = generator(graphdef, sampling, end_token=eot, n_valid=tokenizer.n_vocab,
                        num_samples=num_samples)
  new_tokens = jax.device_get(generate(params, jnp.asarray([prompt_tokens], jnp.int32),
                                       jax.random.key(seed)))
  return [text_until(tokenizer, row.tolist(), eot, after) for row in new_tokens]


def sample(graphdef, params, tokenizer, prompt: str, sampling: SamplingConfig, *, seed: int,
           eot: int | None = None, num_samples: int = 1) -> list[str]:
  """num_samples times the prompt and a continuation of it; eot (default: the tokenizer's
  end-of-text) ends each."""
  eot = tokenizer_lib.separator_id(tokenizer) if eot is None else eot
  prompt_tokens = tokenizer.encode_ordinary(prompt) or [eot]
  return [prompt + text for text in _continuations(graphdef, params, tokenizer, prompt_tokens,
                                                   sampling, seed=seed, eot=eot,
                                                   num_samples=num_samples,
                                                   after=prompt_tokens if prompt else ())]


_speculative_generator = functools.lru_cache(maxsize=4)(make_speculative_generate)


def speculative_sample(loaded: Loaded, draft_workdir: str, prompt: str,
                       sampling: SamplingConfig, *, gamma: int, seed: int) -> tuple[str, dict]:
  """(the prompt and its continuation as sample() draws it, with the latest checkpoint of
  draft_workdir proposing tokens; {'rounds', 'accepted', 'drafted'}: target passes, and
  drafted tokens kept of those made)."""
  draft = restore(draft_workdir)
  target_config = nnx.merge(loaded.graphdef, loaded.params).config
  _check_samples(target_config)
  check_same_vocabulary(target_config, nnx.merge(draft.graphdef, draft.params).config,
                        loaded.tokenizer, draft.tokenizer, f'--draft={draft_workdir}')
  eot = loaded.sample_end
  prompt_tokens = loaded.tokenizer.encode_ordinary(prompt) or [eot]
  generate = _speculative_generator(loaded.graphdef, draft.graphdef, sampling, gamma=gamma,
                                    end_token=eot, n_valid=loaded.tokenizer.n_vocab)
  new_bt, rounds, accepted = jax.device_get(generate(
      loaded.params, draft.params, jnp.asarray([prompt_tokens], jnp.int32), jax.random.key(seed)))
  stats = {'rounds': int(rounds), 'accepted': int(accepted), 'drafted': int(rounds) * gamma}
  after = prompt_tokens if prompt else ()
  return prompt + text_until(loaded.tokenizer, new_bt[0].tolist(), eot, after), stats


def chat_reply(graphdef, params, tokenizer, template: ChatTemplate, messages: list[dict],
               sampling: SamplingConfig, *, seed: int) -> str:
  """The assistant's next message after `messages`, rendered with the template's generation
  prompt; it ends at the template's end-of-turn token."""
  prompt = render(template, messages, add_generation_prompt=True)
  prompt_tokens = tokenizer.encode(prompt, allowed_special=set(template.special_tokens),
                                   disallowed_special=())
  return _continuations(graphdef, params, tokenizer, prompt_tokens, sampling, seed=seed,
                        eot=tokenizer.encode_single_token(template.end_token))[0]


def hf_to_workdir(hf_checkpoint: str, run: TrainConfig, overrides: list[str],
                  tokenizer: str | None = None):
  """A new run.workdir whose step-0 checkpoint holds a Hugging Face folder's parameters."""
  model, run = load_hf(hf_checkpoint, overrides, run, tokenizer)
  _write_workdir(model, run, hf_checkpoint)


def _write_workdir(model, run: TrainConfig, source: str):
  """A new run.workdir whose step-0 checkpoint holds model's parameters, from `source`."""
  if os.path.exists(config_path(run.workdir)):
    raise WorkdirError(f'{run.workdir} already holds a run; pass a new --workdir')
  optimizer = OptimizerConfig().resolved(run.steps, model.config.family)
  with locked(run.workdir):
    record_config(run.workdir, {'model': model.config, **dataclasses.asdict(run),
                                'optimizer': dataclasses.asdict(optimizer)})
    checkpoints = Checkpoints(run.workdir)
    checkpoints.save(0, {'params': nnx.state(model)},
                     {'step': 0, 'params_only': True, 'source': source,
                      'tokenizer': run.tokenizer})
    checkpoints.close()


def with_quantized_weights(loaded: Loaded, spec: str) -> Loaded:
  """`loaded` (a float decoder, or one trained with qat) with its dense kernels quantised as
  `spec` says (models/weight_quant.py)."""
  model = nnx.merge(loaded.graphdef, loaded.params)
  if model.config.quantize:
    raise ConfigError(f'{loaded.source} is quantised already (quantize='
                      f'{model.config.quantize!r}); --quantize takes a float model')
  parsed = weight_quant.parse_spec(spec, '--quantize')
  config = dataclasses.replace(model.config, quantize=spec, qat='').validate()
  model = weight_quant.quantize_kernels(model, parsed)
  model.config = config
  graphdef, params = nnx.split(model)
  return dataclasses.replace(loaded, graphdef=graphdef, params=params,
                             source=f'{loaded.source} quantised {spec}')


def with_kv_cache_dtype(loaded: Loaded, kv_cache_dtype: str) -> Loaded:
  """`loaded`, decoding with its KV cache held as kv_cache_dtype (models/kv_cache.py)."""
  model = nnx.merge(loaded.graphdef, loaded.params)
  model.config = dataclasses.replace(model.config, kv_cache_dtype=kv_cache_dtype).validate()
  graphdef, params = nnx.split(model)
  return dataclasses.replace(loaded, graphdef=graphdef, params=params)


def write_quantized(loaded: Loaded, workdir: str | None):
  """A new workdir whose step-0 checkpoint holds a quantised model's codes and scales."""
  if not workdir:
    raise ConfigError('--mode=convert --quantize needs --quantized_workdir=<new workdir> to '
                      'write the quantised model to')
  _write_workdir(nnx.merge(loaded.graphdef, loaded.params),
                 dataclasses.replace(loaded.run, workdir=workdir), loaded.source)


def prune(workdir: str, out_workdir: str | None, spec: str, score: str,
          calibration_batches: int) -> tuple[Loaded, float]:
  """Writes the workdir's latest parameters pruned (models/pruning.py) to a new workdir, the
  Wanda scores calibrated on `calibration_batches` batches of its training split; returns
  (the pruned model, the share of the covered weights that are zero)."""
  parsed = pruning.parse_spec(spec)
  if score not in pruning.SCORES:
    raise ConfigError(f'--prune_score={score!r} is not one of {", ".join(pruning.SCORES)}')
  if not out_workdir:
    raise ConfigError('--mode=prune needs --pruned_workdir=<new workdir> to write to')
  loaded = restore(workdir)
  model = nnx.merge(loaded.graphdef, loaded.params)
  config = dataclasses.replace(model.config, pruned=True).validate()
  if config.quantize:
    raise ConfigError(f'{workdir} holds quantised kernels; prune the float run')
  norms = None
  if score == 'wanda':
    norms = pruning.input_norms(model, steps_lib.model_logits,
                                _calibration_batches(loaded, calibration_batches))
  sparsity = pruning.prune(model, parsed, norms)
  model.config = config
  graphdef, params = nnx.split(model)
  pruned = dataclasses.replace(loaded, graphdef=graphdef, params=params,
                               source=f'{workdir} {loaded.source} pruned {spec} by {score}')
  _write_workdir(model, dataclasses.replace(loaded.run, workdir=out_workdir), pruned.source)
  return pruned, sparsity


def _calibration_batches(loaded: Loaded, n: int) -> list[dict]:
  """The first n training batches of the run's data, as its training drew them."""
  run = loaded.run
  splits = corpus_lib.split_corpus(run.data, run.val_fraction)
  with tempfile.TemporaryDirectory() as scratch:
    tokens = tokenize(run, loaded.tokenizer, splits, scratch=scratch, log=lambda *a: None)['train']
    return [jax.tree.map(jnp.asarray, batches_lib.train_batch(
        tokens, seed=run.seed, step=step, batch_size=run.micro_batch_size, seq_len=run.seq_len,
        end_token=end_token(run, loaded.tokenizer))) for step in range(n)]


def _pad_token(loaded: Loaded, config: ModelConfig) -> int | None:
  """The pad_token_id of a scoring model's config.json: transformers reads each row's score
  at its last token that is not this one. The end-of-text token, which no rendered
  conversation holds. None for a language model."""
  return tokenizer_lib.separator_id(loaded.tokenizer) if config.n_labels else None


def _exported_model(loaded: Loaded, format_name: str):
  """The loaded model as an export writes it: without a value head, float kernels (a
  quantised one is refused), pruning's zeros in place of its masks."""
  model = without_value_head(nnx.merge(loaded.graphdef, loaded.params))
  if model.config.quantize:
    raise ConfigError(f'{loaded.source} holds quantised kernels (quantize='
                      f'{model.config.quantize!r}); {format_name} export writes float weights: '
                      'convert the float run')
  if model.config.pruned:  # Exported models hold the zeros, not the masks.
    model = pruning.remove_masks(model)
  return model


def workdir_to_hf(workdir: str, hf_out: str | None, peft_out: str | None = None) -> int:
  """Writes the workdir's latest parameters to a new Hugging Face folder and, for a LoRA,
  prompt- or prefix-tuning run, its adapter to a new peft folder (then hf_out gets the base
  model it adapts, so that peft.PeftModel.from_pretrained(<hf_out model>, peft_out) is the
  run's model); returns the step."""
  loaded = restore(workdir)
  model = _exported_model(loaded, 'Hugging Face')
  if peft_out:
    if not model.config.peft:
      raise ConfigError(f'{workdir} is not a PEFT run (peft=\'\'); --peft_out writes the '
                        'adapter of a LoRA, prompt- or prefix-tuning run')
    if model.config.n_labels:
      raise ConfigError(f'{workdir} has a score head, which a peft adapter folder does not '
                        'hold here; --mode=merge writes the whole model to --hf_out')
    adapters.save(model, peft_out, base_model_name_or_path=hf_out)
  if hf_out:
    hf.save(adapters.base_model(model), hf_out, pad_token_id=_pad_token(loaded, model.config))
  return loaded.step


def to_gguf(loaded: Loaded, path: str, file_type: str, template: ChatTemplate | None):
  """Writes a loaded model (a workdir's latest checkpoint or a Hugging Face folder) to the new
  GGUF file `path`, with its tokenizer, chat template and end token (the template's end of
  turn, else the end of text) in the metadata."""
  model = _exported_model(loaded, 'GGUF')
  if model.config.peft:
    raise ConfigError(f'{loaded.source} has {model.config.peft} adapters; GGUF export writes a '
                      'plain model (--mode=merge first for a LoRA run)')
  eos = (loaded.tokenizer.encode_single_token(template.end_token) if template
         else loaded.sample_end)
  bos = (loaded.tokenizer.encode_single_token(template.bos_token)
         if template and template.bos_token else eos)
  tokenizer = gguf_tokenizer.metadata_of(loaded.tokenizer, model.config.vocab_size,
                                         bos_token=bos, eos_token=eos,
                                         chat_template=template and template.source)
  hf_config, tensors = hf.hf_tensors(model)
  gguf_files.write(hf_config, tensors, path, file_type=file_type, tokenizer=tokenizer)


def merge_lora(workdir: str, *, hf_out: str | None, out_workdir: str | None) -> int:
  """Writes a LoRA run's latest parameters with the adapters folded into the kernels, as a
  plain model: to a new Hugging Face folder and/or a new workdir; returns the step."""
  if not (hf_out or out_workdir):
    raise ConfigError('--mode=merge needs --hf_out=<new folder> or --merged_workdir=<new '
                      'workdir> to write the merged model to')
  loaded = restore(workdir)
  model = without_value_head(nnx.merge(loaded.graphdef, loaded.params))
  if model.config.peft != 'lora':
    raise ConfigError(f'{workdir} has no LoRA adapters to merge (peft={model.config.peft!r})')
  merged = lora.merge(model)
  if hf_out:
    hf.save(merged, hf_out, pad_token_id=_pad_token(loaded, model.config))
  if out_workdir:
    _write_workdir(merged, dataclasses.replace(loaded.run, workdir=out_workdir),
                   f'{workdir} checkpoint {loaded.step}, LoRA merged')
  return loaded.step


def with_peft_checkpoint(loaded: Loaded, folder: str) -> Loaded:
  """`loaded` (a plain model) with the adapter (LoRA or prompt tuning) of a Hugging Face peft
  folder."""
  model = adapters.load(nnx.merge(loaded.graphdef, loaded.params), folder)
  graphdef, params = nnx.split(model)
  return dataclasses.replace(loaded, graphdef=graphdef, params=params,
                             source=f'{loaded.source} with {folder}')


def train_tokenizer(spec: str | None, data: str | None, val_fraction: float, out: str) -> str:
  """Trains a bpe:... or wordpiece:... vocabulary on the training split into `out`; returns
  what was written."""
  if not spec:
    raise DataError('--mode=tokenizer needs --tokenizer=bpe:<size> or wordpiece:<size>')
  if not out:
    raise DataError('--mode=tokenizer needs --tokenizer_out=<path> for the vocabulary')
  if os.path.exists(out):
    raise DataError(f'{out} already exists; pass another --tokenizer_out')
  splits = corpus_lib.split_corpus(data, val_fraction)
  start = time.perf_counter()
  tokenizer_lib.train_tokenizer(spec, corpus_lib.texts_of(splits['train']), out)
  tokenizer = tokenizer_lib.load_tokenizer(out)
  return (f'wrote {out}: {tokenizer.n_vocab} tokens, trained on {len(splits["train"])} files '
          f'in {time.perf_counter() - start:.1f}s')


def resolved_vocab(config: ModelConfig, run: TrainConfig) -> ModelConfig:
  """config with vocab_size 0 resolved against the run's tokenizer (trained on its data where
  the spec says so), as training resolves it."""
  run = run.resolved(config)
  return resolve_vocab(config, load_run_tokenizer(run, corpus_lib.split_corpus(
      run.data, run.val_fraction)))


def preset_config(name: str, overrides: list[str]) -> ModelConfig:
  """The preset `name` with --set overrides on top, validated."""
  return with_overrides(preset(name), overrides).validate()
