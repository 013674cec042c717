"""The authors' stack: their concatenated network in Keras 3 on TensorFlow, timed like ours.

Runs under the interpreter named by ``COVID_CXR_KERAS_PYTHON`` (a venv with ``tensorflow-cpu`` and
``keras``; see RESULTS.md), never under the project's. The model is the authors' code: Xception and
ResNet50V2 from ``keras.applications`` on one 300x300x3 input, concatenated, Conv2D 1024 1x1,
Flatten, Dropout 0.5, Dense 3 softmax (kernel N(0, 0.001)), compiled with Nadam(1e-4) and
categorical cross-entropy. Weights are random (``weights=None``): speed does not depend on them, and
no download is possible here. Inference is ``predict_on_batch`` and a training step
``train_on_batch``, the compiled functions behind Keras' ``predict`` and ``fit``.

    python -m benchmarks.keras_worker --task infer --batch-sizes 1 20
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import cpu_seconds, emit, peak_rss_mib, time_call  # noqa: E402


def build_authors_model(image_size: int):  # noqa: ANN201 (keras is not importable for annotations here)
    import keras
    from keras import layers

    inputs = keras.Input(shape=(image_size, image_size, 3))
    xception = keras.applications.Xception(weights=None, include_top=False, input_tensor=inputs)
    resnet = keras.applications.ResNet50V2(weights=None, include_top=False, input_tensor=inputs)
    x = layers.concatenate([xception.output, resnet.output])
    x = layers.Conv2D(1024, (1, 1))(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(stddev=0.001))(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Nadam(learning_rate=1e-4), loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("infer", "train"), required=True)
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = build_authors_model(args.image_size)
    rng = np.random.default_rng(0)
    base = {
        "side": "keras",
        "config": "keras-tf-fp32",
        "task": args.task,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()},
        "threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
        "params": int(model.count_params()),
    }
    for batch in args.batch_sizes:
        x = rng.random((batch, args.image_size, args.image_size, 3), dtype=np.float32)
        if args.task == "infer":
            timing = time_call(lambda: model.predict_on_batch(x), warmup=args.warmup, reps=args.reps)
            figure = {"images_per_s": batch / timing["median_s"]}
        else:
            y = keras.utils.to_categorical(rng.integers(0, 3, batch), 3)
            timing = time_call(lambda: model.train_on_batch(x, y), warmup=args.warmup, reps=args.reps)
            figure = {"step_s": timing["median_s"]}
        emit({**base, "batch": batch, **figure, **timing, "peak_rss_mib": peak_rss_mib(), "cpu": cpu_seconds()})


if __name__ == "__main__":
    main()
