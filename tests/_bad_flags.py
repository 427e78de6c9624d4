"""Every flag of a training binary with a bad value: which ones get a clear error.

    python tests/_bad_flags.py density|classifier WORK_DIR

`sweep` (the tests call it in their process; tests/_binaries.py imports the binary without
touching absl's global flags): for each case it parses the arguments into a fresh `FlagValues`,
resolves them into the task config and runs the checks a run makes before it trains
(`tf_iresnet.tasks.run.preflight`). A case is *clear* when it fails with a flag error or a
`ConfigError` (what the binary prints as a one-line usage error, exit status 1); anything else
(another exception, or no error) is reported with its type. As a script it prints ``RESULT``
and the JSON of `sweep`'s ``{case: [kind, first line of the message]}``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cases(work: str, binary: str = "density") -> dict[str, list[str]]:
    """Bad invocations shared by both binaries, by name."""
    a_file = os.path.join(work, "a_file")
    with open(a_file, "w") as f:
        f.write("not a directory\n")
    empty_data = os.path.join(work, "no_data")
    os.makedirs(empty_data, exist_ok=True)
    run = [f"--model_dir={os.path.join(work, 'run')}", "--export_dir="]
    return {
        "dataset_unknown": ["--dataset=nope"],
        "preset_unknown": ["--preset=nope"],
        "model_dir_is_file": [f"--model_dir={a_file}", "--export_dir="],
        "model_dir_under_file": [f"--model_dir={a_file}/run", "--export_dir="],
        "export_dir_is_file": [f"--model_dir={work}/run_e", f"--export_dir={a_file}"],
        "export_dir_under_file": [f"--model_dir={work}/run_e", f"--export_dir={a_file}/x/y"],
        "batch_size_zero": [*run, "--batch_size=0"],
        "batch_size_negative": [*run, "--batch_size=-4"],
        "batch_size_text": [*run, "--batch_size=big"],
        "batch_size_over_dataset": [*run, "--batch_size=5000"],
        "train_steps_negative": [*run, "--train_steps=-1"],
        "train_steps_float": [*run, "--train_steps=1.5"],
        "epochs_zero": [*run, "--epochs=0"],
        "epochs_negative": [*run, "--epochs=-2"],
        "epochs_and_steps": [*run, "--epochs=1", "--train_steps=3"],
        "strategy_unknown": [*run, "--strategy=tpu"],
        "seed_negative": [*run, "--seed=-1"],
        "seed_too_large": [*run, f"--seed={2**40}"],
        "eval_every_negative": [*run, "--eval_every=-1"],
        "checkpoint_every_negative": [*run, "--checkpoint_every=-1"],
        "log_every_zero": [*run, "--log_every=0"],
        "coeff_one": [*run, "--coeff=1"],
        "coeff_zero": [*run, "--coeff=0"],
        "coeff_nan": [*run, "--coeff=nan"],
        "power_iterations_negative": [*run, "--power_iterations=-1"],
        "jit_compile_text": [*run, "--jit_compile=maybe"],
        "lr_zero": [*run, "--lr=0"],
        "lr_negative": [*run, "--lr=-0.1"],
        "lr_nan": [*run, "--lr=nan"],
        "lr_inf": [*run, "--lr=inf"],
        "tfds_not_prepared": [*run, f"--data_dir={empty_data}", "--dataset=mnist",
                              "--preset=" + ("bench_mnist" if binary == "density"
                                             else "mnist_classifier_paper")],
        "unknown_flag": [*run, "--no_such_flag=1"],
    }


def density_cases(work: str) -> dict[str, list[str]]:
    run = [f"--model_dir={os.path.join(work, 'run')}", "--export_dir="]
    return {
        "optimizer_unknown": [*run, "--optimizer=lbfgs"],
        "warmup_negative": [*run, "--warmup_steps=-1"],
        "weight_decay_negative": [*run, "--weight_decay=-1"],
        "logdet_unknown": [*run, "--logdet=magic"],
        "logdet_none": [*run, "--logdet=none"],
        "n_terms_zero": [*run, "--n_terms=0"],
        "n_samples_zero": [*run, "--n_samples=0"],
        "n_exact_terms_negative": [*run, "--n_exact_terms=-1"],
        "probe_unknown": [*run, "--probe=uniform"],
        "neumann_text": [*run, "--neumann_gradient=perhaps"],
        "recompute_text": [*run, "--recompute=perhaps"],
        "gradient_memory_unknown": [*run, "--gradient_memory=tiny"],
        "logdet_in_forward_recompute": [*run, "--gradient_memory=logdet_in_forward",
                                        "--recompute"],
        "logdet_in_forward_exact": [*run, "--gradient_memory=logdet_in_forward",
                                    "--logdet=exact"],
        "eval_examples_negative": [*run, "--eval_examples=-1"],
        "num_samples_zero": [*run, "--num_samples=0"],
        "preset_of_other_shape": [*run, "--dataset=moons", "--preset=digits_density"],
        "epochs_on_stream": [*run, "--dataset=moons", "--preset=toy2d_density", "--epochs=1"],
        "classifier_preset": [*run, "--preset=digits_classifier"],
    }


def classifier_cases(work: str) -> dict[str, list[str]]:
    run = [f"--model_dir={os.path.join(work, 'run')}", "--export_dir="]
    return {
        "l2_negative": [*run, "--l2_penalty=-1"],
        "hybrid_weight_negative": [*run, "--hybrid_weight=-1"],
        "hybrid_on_padded": [*run, "--hybrid_weight=1"],
        "preset_of_other_shape": [*run, "--preset=cifar10_classifier_paper"],
        "classes_mismatch": [*run, "--dataset=cifar100", "--preset=cifar10_classifier_paper"],
        "density_preset": [*run, "--preset=digits_density"],
        "train_steps_zero": [*run, "--train_steps=0"],
        "unlabelled_dataset": [*run, "--dataset=celeb_a"],
    }


def sweep(binary_name: str, work: str) -> dict[str, list[str]]:
    """``{case: [kind, first line of the message]}`` of every case of ``binary_name``."""
    from absl import flags

    from tf_iresnet.tasks import classifier as classifier_task
    from tf_iresnet.tasks import density, run
    from tf_iresnet.tasks.common import ConfigError

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _binaries import binary as import_binary

    binary = import_binary(binary_name)
    is_density = binary_name == "density"
    task_type = density.DensityTask if is_density else classifier_task.ClassifierTask
    all_cases = {**cases(work, binary_name),
                 **(density_cases(work) if is_density else classifier_cases(work))}
    out = {}
    for name, args in all_cases.items():
        fv = flags.FlagValues()
        binary.define_flags(fv)
        try:
            fv([f"train.{binary_name}", *args])
            config = binary.config_from_flags(fv)
            run.preflight(task_type(config))
            out[name] = ["no error", ""]
        except (flags.Error, ConfigError) as e:
            out[name] = ["clear", str(e).splitlines()[0] if str(e) else ""]
        except Exception as e:  # noqa: BLE001 - what the sweep counts
            out[name] = [type(e).__name__, str(e).splitlines()[0] if str(e) else ""]
    return out


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print("RESULT" + json.dumps(sweep(sys.argv[1], sys.argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
