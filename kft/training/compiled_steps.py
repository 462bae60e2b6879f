"""The loop's compiled functions: a chunk of training steps, one prediction step, a cross-worker vote.

Each is a tf.function traced once (per input shape) and run under the distribution strategy.
Training runs `n` steps per call (--steps_per_execution) so the Python loop's overhead is paid
once per chunk, not per step.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class CompiledSteps:
    """The traced train, predict and agreement functions of one model, optimizer and strategy."""

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn,
                 strategy: tf.distribute.Strategy, jit_compile: bool, predict_fn=None):
        self.model, self.optimizer, self.loss_fn, self.strategy = model, optimizer, loss_fn, strategy
        # (features, labels) -> outputs to keep per example; default: the model's outputs
        self.predict_fn = predict_fn
        self.trace_count = 0  # traces of the train function: more than one per shape means retracing
        self.train_chunk = self._train_function(jit_compile)
        self.predict_step = self._predict_function()
        self._any_worker = self._agreement_function()

    def _train_function(self, jit_compile: bool):
        model, optimizer, loss_fn, strategy = self.model, self.optimizer, self.loss_fn, self.strategy

        def replica_step(batch):
            features, labels, weights = batch
            with tf.GradientTape() as tape:
                probabilities = model(features, training=True)
                # weights already divide by the global batch's example count: the replicas' sums
                # add up to the global mean loss, and their summed gradients to its gradient.
                loss = tf.reduce_sum(loss_fn(labels, probabilities) * weights)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        if jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        @tf.function
        def train_chunk(iterator, n):
            self.trace_count += 1  # Python side effect: runs once per trace, never per step
            losses = tf.TensorArray(tf.float32, size=n)
            for i in tf.range(n):
                per_replica = strategy.run(replica_step, args=(next(iterator),))
                losses = losses.write(i, strategy.reduce("SUM", per_replica, axis=None))
            return losses.stack()

        return train_chunk

    def _predict_function(self):
        model, strategy, predict_fn = self.model, self.strategy, self.predict_fn

        @tf.function
        def predict_step(iterator):
            features, labels, _ = next(iterator)
            if predict_fn is None:
                probabilities = strategy.run(lambda f: model(f, training=False), args=(features,))
            else:
                probabilities = strategy.run(predict_fn, args=(features, labels))
            return strategy.gather(probabilities, axis=0)

        return predict_step

    def _agreement_function(self):
        strategy = self.strategy

        @tf.function
        def any_worker(flag):
            return strategy.reduce("SUM", strategy.run(lambda x: tf.identity(x), args=(flag,)), axis=None)

        return any_worker

    def any_worker(self, flag: int) -> int:
        """How many workers passed a true `flag` (a collective: every worker must call it)."""
        return int(self._any_worker(tf.constant(int(flag))).numpy())

    def refresh_predict_function(self) -> None:
        """Traces prediction again: after the model's layers changed (quantized), the old trace
        would keep computing with the variables it captured."""
        self.predict_step = self._predict_function()
