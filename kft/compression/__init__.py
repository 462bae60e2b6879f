"""Compression of a fine-tuned model: quantisation, distillation into a smaller student, pruning.

quantization.py: Keras' own `model.quantize` after training, evaluated and exported beside float32.
distillation.py: teacher outputs computed once per training example, the KL + task loss.
students.py:     a student backbone keeping K of the teacher's transformer layers.
pruning.py:      gradual magnitude pruning with masks that stay zero through optimizer steps.
"""
