"""TrainConfig: what a training run does besides the model and the optimizer.

Each field's comment is its --flag's help text (training/dataclass_flags.py); None marks a
default that depends on the model, filled in by resolved().
"""
import dataclasses

from lmlab.models.config import ModelConfig
from lmlab.models.errors import ConfigError
from lmlab.training import wandb_log
from lmlab.training.policy_losses import GRPO_LOSSES
from lmlab.training.preference_losses import DPO_LOSSES, SMOOTHED

# The objectives that read chat data, rendered with --chat_template.
CHAT_OBJECTIVES = ('sft', 'reward', 'dpo', 'grpo', 'rsft', 'ppo')
# The objectives that sample their batches from the policy (training/online.py).
ONLINE_OBJECTIVES = ('grpo', 'rsft', 'ppo')
# What a family learns unless --objective says otherwise.
FAMILY_OBJECTIVES = {'decoder': 'lm', 'encoder_decoder': 'seq2seq'}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # Run folder (config, metrics, checkpoints, token cache); default runs/<model>.
  workdir: str | None = None
  steps: int = 500  # Training steps (optimizer updates).
  batch_size: int = 32  # Sequences per step (split over --grad_accum).
  seq_len: int = 128  # Tokens per sequence.
  grad_accum: int = 1  # Micro-batches whose gradients make one update.
  seed: int = 0  # Seed of initialisation, batches and dropout.
  # A text file, directory or glob; default: the Python standard library of this interpreter.
  data: str | None = None
  val_fraction: float = 0.05  # Share of files (or of a single file) held out.
  # bytes | bpe:<size>[:gpt2|:cl100k][:digits] | wordpiece:<size> | a .tiktoken,
  # tokenizer.json or vocab.txt file (data/tokenizer.py); default bytes, wordpiece:8192 for
  # BERT presets, with --init_from that run's.
  tokenizer: str | None = None
  # Pre-tokenisation (gpt2, cl100k or a regex) of a .tiktoken file that has no .json beside it.
  tokenizer_pattern: str | None = None
  tokenizer_sha256: str | None = None  # Expected sha256 of a .tiktoken --tokenizer file.
  # Keep packed documents from attending to each other (segment ids at end-of-text tokens).
  document_masking: bool = True
  z_loss: float = 0.0  # Weight of the log^2 Z logit penalty (PaLM: 1e-4); 0: off.
  max_z_loss: float = 0.0  # Weight of the max-logit^2 penalty (Baichuan 2: 2e-4); 0: off.
  # What to learn (training/objectives.py: lm, sft, reward, dpo, grpo, rsft, ppo, bert,
  # roberta, classify, seq2seq, distill); default: lm for decoders, bert or roberta for encoders (by
  # their NSP head), seq2seq for encoder-decoders.
  objective: str | None = None
  # sft, reward, dpo, grpo, rsft, ppo and --mode=chat: how conversations are rendered: chatml,
  # llama2, llama3, or a Hugging Face folder whose tokenizer_config.json (or
  # chat_template.jinja) has a chat_template; its special tokens join the tokenizer. Default
  # for those objectives: chatml.
  chat_template: str | None = None
  # seq2seq: target mass spread over the vocabulary; default 0.1 (Vaswani et al. 2017), else 0.
  # dpo: the probability that a pair's labels are flipped (cDPO, rDPO, SimPO); default 0.
  label_smoothing: float | None = None
  # dpo: the loss (training/preference_losses.py): sigmoid (DPO), robust, hinge, ipo, or simpo
  # (reference-free).
  dpo_loss: str = 'sigmoid'
  # dpo: the KL penalty's strength beta (SimPO: the reward scale); default 0.1, simpo 2.0;
  # grpo: the weight of the KL penalty, default 0.04 (DeepSeekMath); ppo: the per-token KL
  # penalty's, default 0.05.
  beta: float | None = None
  simpo_gamma: float = 0.5  # dpo with --dpo_loss=simpo: the target reward margin gamma.
  # dpo: the weight alpha of the chosen replies' mean negative log-likelihood per token, added
  # to the loss (RPO, Pang et al. 2024; TRL's loss_type ['sigmoid', 'sft']); 0: off.
  rpo_alpha: float = 0.0
  # grpo, rsft, ppo: what judges a completion: module:function(prompt, completion) -> number,
  # or a reward model's workdir; default for --data=synthetic:arithmetic: its exact checker.
  reward: str | None = None
  # grpo: completions per prompt (G); rsft: samples per prompt, of which the best trains.
  group_size: int = 8
  completion_tokens: int = 16  # grpo, rsft, ppo: the most tokens a sampled completion has.
  # grpo, rsft, ppo: the temperature completions are sampled at.
  sample_temperature: float = 1.0
  # grpo: the loss (training/policy_losses.py): grpo (DeepSeekMath) or dr_grpo (no std
  # scaling of advantages, no per-completion length normalisation).
  grpo_loss: str = 'grpo'
  clip_epsilon: float = 0.2  # grpo, ppo: the ratio's clip range 1 +- epsilon.
  # rsft: the reward below which a prompt's best sample is not trained on; default: none.
  min_reward: float | None = None
  ppo_epochs: int = 4  # ppo: passes over each rollout batch.
  # ppo: updates per pass, each on its share of the rollout's --grad_accum micro-batches (it
  # must divide --grad_accum), in the same order every pass.
  ppo_minibatches: int = 1
  gamma: float = 1.0  # ppo: the discount of later rewards.
  gae_lambda: float = 0.95  # ppo: lambda of generalised advantage estimation.
  value_coef: float = 0.1  # ppo: the weight of the value loss.
  value_clip: float = 0.2  # ppo: how far a value may move from the rollout's (clipped loss).
  whiten_rewards: bool = False  # ppo: scale the batch's rewards to unit variance first.
  # distill: the teacher, a training run's workdir or a Hugging Face folder, whose tokenizer
  # is the student's.
  teacher: str | None = None
  distill_temperature: float = 2.0  # distill: T, the softening of both distributions.
  # distill: the weight of the soft loss T^2 KL(teacher || student), the hard next-token
  # loss taking the rest (Hinton et al. 2015).
  distill_weight: float = 0.5
  beam_size: int = 4  # seq2seq eval: beam search width beside greedy decoding; 1: greedy only.
  length_penalty: float = 0.6  # seq2seq beam search: alpha of ((5+len)/6)^alpha.
  eval_every: int = 100  # Evaluate every N steps.
  eval_batches: int = 16  # Validation batches per evaluation.
  # Built-in tasks evaluated with the validation loss, e.g. bpb,lambada_style,mc:q.jsonl
  # (training/eval_tasks.py), logged as eval/<task>/<metric>.
  eval_tasks: str = ''
  # Also log to Weights & Biases: online or offline (needs the wandb package; training/
  # wandb_log.py). '': off.
  wandb: str = ''
  wandb_project: str = 'lmlab'  # The W&B project of --wandb runs.
  save_every: int = 100  # Checkpoint every N steps.
  keep_checkpoints: int = 3  # Checkpoints kept.
  # Resume from this checkpoint step; newer ones are moved aside to <step>.superseded.
  # Default: the newest readable one (unreadable newer ones are moved to <step>.unreadable).
  resume_step: int | None = None
  log_every: int = 10  # Log a metrics line every N steps.
  # Device mesh: sizes of the data, fsdp and tensor axes, e.g. data:2,fsdp:2,tensor:2 (-1: the
  # devices left; unnamed axes: 1).
  mesh: str = 'data:-1'
  # Changes to the logical-axis rules (models/sharding.py), e.g.
  # embed:none,batch:data+fsdp,length:tensor.
  logical_rules: str = ''
  # Peak FLOP/s of one device for the MFU metric; 0: from the table of known GPUs and TPUs
  # (training/mfu.py).
  peak_flops: float = 0.0

  @property
  def updates_per_step(self) -> int:
    """Optimizer updates a step takes: PPO's epochs times minibatches, else one."""
    return self.ppo_epochs * self.ppo_minibatches if self.objective == 'ppo' else 1

  @property
  def minibatches(self) -> int:
    """The groups of micro-batches a step's updates take in turn (PPO's minibatches)."""
    return self.ppo_minibatches if self.objective == 'ppo' else 1

  @property
  def micro_batch_size(self) -> int:
    """Sequences per micro-batch: the batch split over grad_accum (also the eval batch)."""
    return self.batch_size // self.grad_accum

  def resolved(self, model_config: ModelConfig) -> 'TrainConfig':
    """The config with the model's defaults in place of None (workdir aside)."""
    objective = self.objective or default_objective(model_config)
    smoothing = self.label_smoothing
    if smoothing is None:
      smoothing = 0.1 if objective == 'seq2seq' else 0.0
    tokenizer = self.tokenizer or ('wordpiece:8192' if model_config.family == 'encoder'
                                   else 'bytes')
    chat_template = self.chat_template or ('chatml' if objective in CHAT_OBJECTIVES else None)
    beta = self.beta
    if beta is None:
      beta = {'grpo': 0.04, 'ppo': 0.05}.get(objective,
                                             2.0 if self.dpo_loss == 'simpo' else 0.1)
    return dataclasses.replace(self, objective=objective, label_smoothing=smoothing,
                               tokenizer=tokenizer, chat_template=chat_template, beta=beta)

  def validate(self) -> 'TrainConfig':
    if not self.workdir:
      raise ConfigError('a training run needs a --workdir')
    for name in ('steps', 'batch_size', 'seq_len', 'grad_accum', 'eval_every', 'eval_batches',
                 'save_every', 'keep_checkpoints', 'log_every'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'--{name}={getattr(self, name)} must be positive')
    if self.batch_size % self.grad_accum:
      raise ConfigError(f'--batch_size={self.batch_size} is not divisible by '
                        f'--grad_accum={self.grad_accum}')
    if self.resume_step is not None and self.resume_step < 0:
      raise ConfigError(f'--resume_step={self.resume_step} must be >= 0')
    if self.beam_size < 1:
      raise ConfigError(f'--beam_size={self.beam_size} must be at least 1')
    for name in ('z_loss', 'max_z_loss', 'label_smoothing'):
      if not 0.0 <= (getattr(self, name) or 0.0) < 1.0:
        raise ConfigError(f'--{name}={getattr(self, name)} must be in [0, 1) (0: off)')
    self._validate_dpo()
    self._validate_sampling()
    self._validate_distillation()
    if self.peak_flops < 0:
      raise ConfigError(f'--peak_flops={self.peak_flops} must be >= 0 (0: the known devices)')
    if not 0.0 < self.val_fraction < 1.0:
      raise ConfigError(f'--val_fraction={self.val_fraction} must be between 0 and 1')
    if self.wandb and self.wandb not in wandb_log.MODES:
      raise ConfigError(f'--wandb={self.wandb!r} is not one of {", ".join(wandb_log.MODES)} '
                        '(empty: off)')
    if self.wandb and wandb_log.missing_package():
      raise ConfigError('--wandb needs the wandb package: pip install wandb')
    return self


  def _validate_sampling(self):
    if self.grpo_loss not in GRPO_LOSSES:
      raise ConfigError(f'--grpo_loss={self.grpo_loss!r} is not one of {", ".join(GRPO_LOSSES)}')
    if self.objective not in ONLINE_OBJECTIVES:
      return
    smallest = 2 if self.objective == 'grpo' else 1
    if self.group_size < smallest:
      raise ConfigError(f'--group_size={self.group_size} must be at least {smallest} for '
                        f'--objective={self.objective}')
    if self.objective == 'grpo' and self.batch_size % self.group_size:
      raise ConfigError(f'--batch_size={self.batch_size} (completions per step) is not a '
                        f'multiple of --group_size={self.group_size}')
    if not 0 < self.completion_tokens < self.seq_len:
      raise ConfigError(f'--completion_tokens={self.completion_tokens} must be positive and '
                        f'below --seq_len={self.seq_len}, which also holds the prompt')
    if not self.sample_temperature > 0:
      raise ConfigError(f'--sample_temperature={self.sample_temperature} must be positive: '
                        'the samples of a prompt must differ')
    if not 0 < self.clip_epsilon < 1:
      raise ConfigError(f'--clip_epsilon={self.clip_epsilon} must be in (0, 1)')
    if self.ppo_epochs < 1:
      raise ConfigError(f'--ppo_epochs={self.ppo_epochs} must be at least 1')
    if self.ppo_minibatches < 1 or self.grad_accum % self.ppo_minibatches:
      raise ConfigError(f'--ppo_minibatches={self.ppo_minibatches} must be a positive divisor '
                        f'of --grad_accum={self.grad_accum}: each update takes a share of its '
                        'micro-batches')
    for name in ('gamma', 'gae_lambda'):
      if not 0 <= getattr(self, name) <= 1:
        raise ConfigError(f'--{name}={getattr(self, name)} must be in [0, 1]')
    if self.value_coef < 0 or self.value_clip <= 0:
      raise ConfigError(f'--value_coef={self.value_coef} must be >= 0 and --value_clip='
                        f'{self.value_clip} positive')

  def _validate_distillation(self):
    if (self.objective == 'distill') != bool(self.teacher):
      raise ConfigError('--objective=distill needs --teacher=<workdir or Hugging Face folder>, '
                        'and --teacher applies to it only')
    if not self.distill_temperature > 0:
      raise ConfigError(f'--distill_temperature={self.distill_temperature} must be positive')
    if not 0 <= self.distill_weight <= 1:
      raise ConfigError(f'--distill_weight={self.distill_weight} must be in [0, 1]')

  def _validate_dpo(self):
    if self.dpo_loss not in DPO_LOSSES:
      raise ConfigError(f'--dpo_loss={self.dpo_loss!r} is not one of {", ".join(DPO_LOSSES)}')
    if self.beta is not None and not self.beta > 0:
      raise ConfigError(f'--beta={self.beta} must be positive')
    if not self.rpo_alpha >= 0:
      raise ConfigError(f'--rpo_alpha={self.rpo_alpha} must be >= 0 (0: off)')
    if self.objective != 'dpo':
      return
    if self.label_smoothing and self.dpo_loss not in SMOOTHED:
      raise ConfigError(f'--label_smoothing={self.label_smoothing}: --dpo_loss={self.dpo_loss} '
                        f'has no label smoothing (only {", ".join(SMOOTHED)})')
    if self.dpo_loss == 'robust' and not (self.label_smoothing or 0.0) < 0.5:
      raise ConfigError(f'--label_smoothing={self.label_smoothing} must be below 0.5 for '
                        '--dpo_loss=robust, which divides by 1 - 2 * label_smoothing')


def default_objective(model_config: ModelConfig) -> str:
  if model_config.family == 'encoder':
    return 'bert' if model_config.nsp_head else 'roberta'
  return FAMILY_OBJECTIVES[model_config.family]
