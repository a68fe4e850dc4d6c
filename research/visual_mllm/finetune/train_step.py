"""The portable train step: loss, gradients of the trainable parameters, data-parallel mean, loss scaling,
clipping and the optimizer update, compiled with `mindspore.jit` (graph mode) - no MindSpore or MindFormers
internals are patched, and only ops with CPU, GPU and Ascend kernels are used.

One step, for a batch from `datasets.BatchSource`:

1. loss = sum over target tokens of cross entropy(logits[i], labels[i+1]) / token_scale
   (token_scale = target tokens of the *global* batch / world size, so that the data-parallel gradient
   mean equals the gradient of the mean over every target token of the global batch);
2. gradients of the trainable parameters (of loss * loss_scale when a loss scaler is used);
3. with data parallel: the gradient mean over ranks (`nn.DistributedGradReducer`);
4. unscale, check that every gradient is finite, adjust the dynamic loss scale (fp16);
5. clip to `grad_clip` by global norm (norm * clip / max(norm, clip), as clip_by_global_norm);
6. if finite, the optimizer update (AdamWeightDecay, its learning rate from the schedule at its own step);
   a non-finite step leaves weights, moments and the optimizer step unchanged (counted as skipped).

Returns (loss (mean over ranks), gradient global norm, finite flag).
"""
import mindspore as ms
from mindspore import nn, ops

from .datasets import IGNORE_INDEX


def token_loss_sum(logits, labels):
    """Sum of the cross entropy of logits[:, i] against labels[:, i+1] over labels != -100 (float32)."""
    logits = logits[:, :-1].astype(ms.float32)  # [B,S-1,V]
    target = labels[:, 1:]  # [B,S-1]
    keep = target != IGNORE_INDEX
    safe = ops.where(keep, target, ops.zeros_like(target))
    logp = ops.log_softmax(logits, axis=-1)
    picked = ops.gather_elements(logp, 2, safe.expand_dims(-1)).squeeze(-1)  # [B,S-1]
    return -(picked * keep.astype(ms.float32)).sum()


class LossNet(nn.Cell):
    """The model with the finetuning loss on top; inputs are the arrays of `datasets.BATCH_KEYS`."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # parameters keep the model's names
        self.model = model

    def logits(self, input_ids, pixel_values, image_start, position_ids, valid_length, prefix_length,
               token_types=None):
        image_embeds = self.model.image_encoder(pixel_values)  # [B,Q,H]
        return self.model(input_ids, image_embeds, image_start, position_ids, valid_length, prefix_length,
                          token_types)  # [B,S,V]

    def construct(self, input_ids, labels, pixel_values, image_start, position_ids, valid_length, prefix_length,
                  token_types, token_scale):
        logits = self.logits(input_ids, pixel_values, image_start, position_ids, valid_length, prefix_length,
                             token_types)
        return token_loss_sum(logits, labels) / token_scale


def global_norm(grads):
    total = ops.zeros((), ms.float32)
    for g in grads:
        total = total + ops.square(g.astype(ms.float32)).sum()
    return ops.sqrt(total)


def clip_grads(grads, norm, clip):
    """grads * clip / max(norm, clip)."""
    factor = clip / ops.maximum(norm, clip)
    out = ()
    for g in grads:
        out = out + (g * factor.astype(g.dtype),)
    return out


def build_optimizer(params, learning_rate, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01):
    """AdamWeightDecay; biases and LayerNorm parameters get no weight decay (as the reference groups them)."""
    params = list(params)

    def no_decay(p):
        name = p.name.lower()
        return name.endswith(".bias") or "layernorm" in name or "norm." in name or p.ndim <= 1

    decay = [p for p in params if not no_decay(p)]
    plain = [p for p in params if no_decay(p)]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    groups.append({"order_params": params})
    return nn.AdamWeightDecay(groups, learning_rate=learning_rate, beta1=float(beta1), beta2=float(beta2),
                              eps=float(eps))


class TrainStep:
    """Callable `step(*batch arrays as Tensors) -> (loss, grad_norm, finite)`; see the module docstring.

    loss_net: LossNet (possibly wrapped by mindspore.amp); optimizer: built on the trainable params;
    grad_clip: <= 0 disables clipping; loss_scaler: mindspore.amp.DynamicLossScaler / StaticLossScaler
    or None; world_size > 1 adds the gradient mean over ranks; compile: wrap in mindspore.jit.
    """

    def __init__(self, loss_net, optimizer, grad_clip=1.0, loss_scaler=None, world_size=1, compile=True):
        self.loss_net = loss_net
        self.optimizer = optimizer
        self.grad_clip = float(grad_clip)
        self.loss_scaler = loss_scaler
        self.world_size = int(world_size)
        self.reducer = None
        self.all_reduce = None
        if self.world_size > 1:
            self.reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=self.world_size)
            self.all_reduce = ops.AllReduce()
        scaler, reducer, all_reduce = loss_scaler, self.reducer, self.all_reduce
        clip, world = self.grad_clip, self.world_size

        def forward(*inputs):
            loss = loss_net(*inputs)
            if scaler is not None:
                loss = scaler.scale(loss)
            return loss

        grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

        def run(*inputs):
            loss, grads = grad_fn(*inputs)
            if reducer is not None:
                grads = reducer(grads)
            if scaler is not None:
                loss = scaler.unscale(loss)
                grads = scaler.unscale(grads)
            finite = ms.amp.all_finite(grads)
            norm = global_norm(grads)
            if clip > 0:
                grads = clip_grads(grads, norm, clip)
            if scaler is not None:
                scaler.adjust(finite)
            if finite:
                optimizer(grads)
            if all_reduce is not None:
                loss = all_reduce(loss) / world
            return loss, norm, finite

        self._step = ms.jit(run) if compile else run

    def __call__(self, *inputs):
        return self._step(*inputs)


__all__ = ["LossNet", "TrainStep", "build_optimizer", "token_loss_sum", "global_norm"]
