"""Shared test set-up: hypothesis profiles, a fresh seed for every test, the forms that run, the
backend every test runs on, and the count of tests that did device work.

Profiles: ``ci`` (derandomized, so CI is repeatable) and ``dev`` (more examples); pick one with
HYPOTHESIS_PROFILE. The default is ``ci``. The suite runs the fast forms (the default) or, under
``MINILORA_REFERENCE=1``, the reference forms; the header of the run says which.

The backend: every test runs on the one ``MINILORA_BACKEND`` names (numpy by default; ``strict``
is the NumPy stand-in for CuPy, ``cupy`` a GPU). A test, or a fixture, that leaves another backend
active fails, and the run's backend is put back for the next test.

Device work: at the end of a run on a device backend the summary says how many tests did device
work, out of every test that ran and is not marked ``host_only(reason)`` (a test of files, of
argument parsing or of tokenizing, which has no array work to put on a device). Under strict a test
did device work when ``minilora.strict`` counted at least one kernel launch while it ran (its
set-up included); on CuPy, when at least one device allocation went through CuPy's allocator.
Under strict the run fails when fewer than ``DEVICE_WORK_MIN`` of those tests did: the suite is
the evidence that the device path works, and a test that quietly ran on the host is none.
"""

import os

# The tests multiply small matrices, where a second BLAS thread only adds hand-offs; on a busy
# machine those hand-offs cost a scheduler time slice each. Must precede numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import minilora as ml  # noqa: E402
from minilora import backend as B  # noqa: E402
from minilora import fast  # noqa: E402
from tests.helpers import DeviceWork  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

RUN_FORMS = fast.enabled()  # the forms this run tests, as MINILORA_REFERENCE chose them at import
RUN_BACKEND = B.get_backend()  # the backend this run tests, as MINILORA_BACKEND chose it
DEVICE_WORK_MIN = 0.95  # under strict: the share of device tests that must do device work
WORK = DeviceWork(RUN_BACKEND)

# Tests with no array work to put on a device, in files whose owners mark them here rather than
# in the file (a mark in the file, @pytest.mark.host_only("why"), works the same): test file ->
# the reason for all of its tests, and "file::test" -> the reason for one test.
_ARGS = "its arguments are refused before any array work"
_CONFIG = "a config's fields, checked on the host"
_THREADS = "the CPU's worker threads and BLAS settings"
HOST_ONLY_MODULES: dict[str, str] = {
    "test_architecture.py": "reads the sources' imports",
    "test_bpe.py": "BPE tokenization is string and integer work on the host",
    "test_bpe_hf.py": "BPE tokenization, against Hugging Face's tokenizer",
    "test_data.py": "tokenizers, tasks and batches are host data (the step uploads them)",
    "test_errors.py": "the error classes and their messages",
    "test_lora_config.py": _CONFIG,
    "test_tensorfile.py": "safetensors and JSON files: parsing and checking bytes",
}
HOST_ONLY_TESTS: dict[str, str] = {
    "test_quant_bnb.py::test_code_tables_equal_bitsandbytes": "constant tables",
    "test_backend.py::test_unknown_backend_raises_and_changes_nothing": "backend selection",
    "test_backend.py::test_cupy_without_cupy_says_how_to_install": "backend selection",
    "test_backend.py::test_backend_context_manager_restores": "backend selection",
    "test_backend.py::test_on_device_names_the_device_backends": "backend selection",
    "test_backend.py::test_env_var_selects_strict": "backend selection, in a subprocess",
    "test_backend.py::test_env_var_is_honoured": "backend selection, in a subprocess",
    "test_backend.py::test_both_cpu_paths_equal_add_at": "NumPy's own scatter-add paths",
    "test_backend.py::test_manual_seed_rejects_bad_seeds": _ARGS,
    "test_backend.py::test_memory_stats_is_a_dict": "the statistics' keys",
    "test_backend.py::test_default_dtype_rejects_non_float32_64": _ARGS,
    "test_fast_attention.py::test_fast_attention_matches_the_reference_around_the_query_split":
        "the fast forms of minilora/fast/ are NumPy's (the CPU's)",
    "test_fast_attention.py::test_n_head_must_be_a_positive_int_in_both_forms": _ARGS,
    "test_fileio.py::test_a_complete_staging_dir_and_no_dest_finishes_the_swap": "files",
    "test_fileio.py::test_finishing_prefers_the_new_save_over_the_old_one": "files",
    "test_fileio.py::test_an_incomplete_staging_dir_is_undone_to_the_old_save": "files",
    "test_fileio.py::test_an_older_save_without_a_manifest_is_put_back_too": "files",
    "test_fileio.py::test_of_two_complete_staging_dirs_the_newest_is_finished": "files",
    "test_fileio.py::test_an_incomplete_staging_dir_alone_is_no_save": "files",
    "test_fileio.py::test_dest_present_wins_over_stray_siblings": "files",
    "test_fileio.py::test_atomic_directory_refuses_a_directory_of_other_files": "files",
    "test_fileio.py::test_atomic_directory_replaces_an_older_save_without_a_manifest": "files",
    "test_fileio.py::test_an_error_inside_the_block_leaves_dest_as_it_was": "files",
    "test_fileio.py::test_check_destination_says_what_is_wrong": "files",
    "test_fileio.py::test_verify_manifest_names_the_file_that_does_not_match": "files",
    "test_fileio.py::test_a_manifest_may_not_point_outside_its_directory": "files",
    "test_fileio.py::test_no_manifest_is_one_warning_and_false": "files",
    "test_fileio.py::test_write_files_is_one_whole_save": "files",
    "test_functional.py::test_cross_entropy_rejects_targets_out_of_range": _ARGS,
    "test_functional.py::test_cross_entropy_rejects_float_targets_and_wrong_shapes": _ARGS,
    "test_functional.py::test_embedding_rejects_indices_out_of_range": _ARGS,
    "test_functional.py::test_embedding_rejects_float_indices": _ARGS,
    "test_functional.py::test_dropout_rejects_bad_p": _ARGS,
    "test_gpt.py::test_config_rejects_bad_fields_by_name": _CONFIG,
    "test_gpt.py::test_config_errors_say_what_a_size_must_be": _CONFIG,
    "test_gpt.py::test_config_round_trips_through_a_dict_and_rejects_unknown_keys": _CONFIG,
    "test_gpt.py::test_gpt_wants_a_config": _CONFIG,
    "test_gpt.py::test_fused_attention_errors": _ARGS,
    "test_gpt.py::test_sampling_follows_softmax_of_logits_over_temperature":
        "sampling draws on the host, from the logits' host copy",
    "test_gpt.py::test_top_k_samples_only_among_the_k_largest":
        "sampling draws on the host, from the logits' host copy",
    "test_gpt.py::test_temperature_zero_and_top_k_one_are_argmax":
        "sampling draws on the host, from the logits' host copy",
    "test_gpt.py::test_generate_rejects_bad_arguments": _ARGS,
    "test_gpt.py::test_generate_rejects_bad_prompts": _ARGS,
    "test_gpt.py::test_config_sizes_beyond_their_named_limit_are_refused": _CONFIG,
    "test_gpt.py::test_config_limits_allow_gpt2_xl_and_a_forged_vocab_is_refused_at_once": _CONFIG,
    "test_gpt.py::test_config_dropout_must_be_a_number_not_a_bool": _CONFIG,
    "test_gpt.py::test_config_from_dict_names_missing_fields_and_wants_a_dict": _CONFIG,
    "test_jsonl.py::test_a_file_parses_to_its_examples_and_records_where_it_came_from":
        "JSONL parsing",
    "test_jsonl.py::test_a_json_string_may_hold_line_separators_that_are_not_newlines":
        "JSONL parsing",
    "test_jsonl.py::test_default_heldout_share": "JSONL parsing",
    "test_jsonl.py::test_batches_are_shifted_examples_scored_on_the_completion_only":
        "batches are host data (the step uploads them)",
    "test_jsonl.py::test_training_batches_never_hold_a_heldout_example":
        "batches are host data (the step uploads them)",
    "test_jsonl.py::test_a_bad_line_is_named_by_file_and_line": "JSONL parsing",
    "test_jsonl.py::test_a_bad_record_in_a_list_is_named_by_its_index": "JSONL parsing",
    "test_jsonl.py::test_empty_files_and_too_few_examples_are_named": "JSONL parsing",
    "test_jsonl.py::test_too_few_examples_for_the_asked_heldout": "JSONL parsing",
    "test_jsonl.py::test_files_that_cannot_be_read_are_named": "JSONL parsing",
    "test_jsonl.py::test_a_tokenizer_without_end_of_text_is_refused_with_the_fix": _ARGS,
    "test_jsonl.py::test_text_that_encodes_to_end_of_text_is_refused": _ARGS,
    "test_jsonl.py::test_bad_arguments_are_named": _ARGS,
    "test_jsonl.py::test_bad_batch_arguments_are_named": _ARGS,
    "test_lora_count.py::test_the_lora_papers_parameter_counts": "counting, by formula",
    "test_lora_count.py::test_analytic_count_rejects_bad_sizes": _ARGS,
    "test_lora_inject.py::test_a_target_that_matches_nothing_lists_the_module_names": _ARGS,
    "test_lora_variants.py::test_rslora_scales_by_the_root_of_the_rank": "the scaling factor",
    "test_nn.py::test_forgetting_super_init_is_explained": _ARGS,
    "test_nn.py::test_linear_rejects_wrong_input_and_bad_sizes": _ARGS,
    "test_nn.py::test_module_list": "the containers' bookkeeping",
    "test_nn.py::test_module_dict_keys_any_name_and_keeps_them_out_of_the_attributes":
        "the containers' bookkeeping",
    "test_nn.py::test_keep_host_rng_leaves_the_stream_where_it_was":
        "the host generator that initialises parameters",
    "test_optim.py::test_adamw_rejects_invalid_settings": _ARGS,
    "test_optim.py::test_sgd_rejects_invalid_settings": _ARGS,
    "test_optim.py::test_invalid_parameter_lists": _ARGS,
    "test_optim.py::test_warmup_cosine_shape": "the schedule is a Python float function",
    "test_optim.py::test_warmup_cosine_rejects_invalid_settings": _ARGS,
    "test_quant.py::test_nf4_table_is_rebuilt_from_normal_quantiles": "constant tables",
    "test_quant.py::test_fp4_table_is_e2m1_over_12_with_a_sign_bit": "constant tables",
    "test_quant.py::test_int4_table_is_symmetric_k_over_7": "constant tables",
    "test_quant.py::test_dynamic_8bit_map_shape_and_gaps": "constant tables",
    "test_quant.py::test_bits_per_parameter_is_exact": "counting, by formula",
    "test_readme_errors.py::test_the_table_has_rows_of_both_kinds": "reads README.md",
    "test_readme_errors.py::test_each_row_is_what_minilora_says":
        "the README's error messages, raised before any array work",
    "test_step.py::test_default_threads_use_the_cores_there_are": _THREADS,
    "test_step.py::test_blas_threads_are_restored_after_a_block": _THREADS,
    "test_step.py::test_freed_memory_can_be_kept_where_glibc_is": "the host allocator",
    "test_step.py::test_tasks_run_side_by_side_and_report_in_order": _THREADS,
    "test_step.py::test_a_failing_task_is_raised_after_all_have_finished": _THREADS,
    "test_step.py::test_tasks_inside_a_task_run_inline": _THREADS,
    "test_step.py::test_balanced_groups_split_every_index_once_and_evenly": _THREADS,
    "test_step.py::test_for_each_in_threads_calls_every_index_once": _THREADS,
    "test_strict.py::test_implicit_conversion_to_numpy_is_refused":
        "the stand-in refuses before it launches",
    "test_strict.py::test_kernels_refuse_host_arrays": "the stand-in refuses before it launches",
    "test_strict.py::test_cuda_stand_ins": "the stand-in's device queries",
    "test_tensor.py::test_no_grad_restores_the_previous_state_after_an_exception_and_nests":
        "the grad mode is a flag",
    "test_tensor.py::test_no_grad_is_per_thread": "the grad mode is a flag",
    "test_tensor.py::test_backward_on_a_tensor_without_grad_raises": _ARGS,
    "test_tensor.py::test_requires_grad_needs_a_float_tensor": _ARGS,
    "test_tensor.py::test_shape_errors_name_the_op_and_both_shapes": _ARGS,
    "test_tensor.py::test_bad_arguments_raise_invalid_argument_errors": _ARGS,
    "test_train.py::test_config_rejects_bad_values_by_name": _CONFIG,
    "test_train.py::test_config_survives_its_json_form": _CONFIG,
    "test_train.py::test_config_messages_name_the_field_the_bound_and_the_value": _CONFIG,
    "test_train.py::test_config_takes_numpy_integers_as_python_ints": _CONFIG,
    "test_train.py::test_the_cli_sets_blas_threads_only_with_the_fast_forms_on": _THREADS,
    "test_train.py::test_a_config_saved_before_shards_existed_meant_one_shard": _CONFIG,
    "test_train_trust.py::test_resume_refuses_a_text_file_that_changed": _ARGS,
    "test_train_trust.py::test_extension_flags_that_do_not_extend_are_refused": _ARGS,
    "test_workflow.py::test_workflow_mistakes_are_one_line": _ARGS,
    "test_workflow.py::test_every_command_has_help_with_an_example": "the help text",
}


def pytest_configure(config):
    """Register the ``host_only(reason)`` mark (pyproject.toml names it too)."""
    config.addinivalue_line("markers", "host_only(reason): has no array work to put on a device; "
                            "left out of the device-work count")


def pytest_report_header(config):
    """The first lines of a run say which forms of the ops and which backend it tests."""
    forms = "fast forms on" if RUN_FORMS else "reference forms (MINILORA_REFERENCE=1)"
    return [f"minilora: {forms}; backend {RUN_BACKEND} ({WORK.describe()})"]


def pytest_collection_modifyitems(config, items):
    """Mark the tests of the host-only tables below ``host_only``, and refuse a
    ``host_only`` mark without its reason."""
    for item in items:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        name = item.nodeid.split("::", 1)[-1].split("[")[0]
        reason = HOST_ONLY_MODULES.get(module) or HOST_ONLY_TESTS.get(f"{module}::{name}")
        if reason and item.get_closest_marker("host_only") is None:
            item.add_marker(pytest.mark.host_only(reason))
        mark = item.get_closest_marker("host_only")
        if mark is not None and not (mark.args and isinstance(mark.args[0], str) and
                                     mark.args[0].strip()):
            raise pytest.UsageError(f"{item.nodeid}: host_only needs its reason, "
                                    f"@pytest.mark.host_only('why no device work belongs here')")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Count the device work done while a test runs (its fixtures' set-up included)."""
    WORK.start(item)
    yield
    WORK.stop(item)


def pytest_runtest_logreport(report):
    """Note which tests ran (a skipped test did no work it was asked for)."""
    WORK.record(report)


@pytest.fixture(autouse=True)
def _seed_dtype_and_backend(request):
    """Each test starts from seed 0, float32 defaults, the run's forms and the run's backend,
    whatever the previous one did; a test that leaves another backend behind fails."""
    before = B.get_backend()
    if before != RUN_BACKEND:  # a fixture of a wider scope switched it, before this test began
        B.use_backend(RUN_BACKEND)
        pytest.fail(f"a fixture of {request.node.nodeid} left backend {before!r} active; this "
                    f"run tests {RUN_BACKEND!r} (MINILORA_BACKEND)", pytrace=False)
    fast.set_enabled(RUN_FORMS)
    ml.manual_seed(0)
    ml.set_default_dtype(np.float32)
    yield
    ml.set_default_dtype(np.float32)
    fast.set_enabled(RUN_FORMS)
    left = B.get_backend()
    if left != RUN_BACKEND:
        B.use_backend(RUN_BACKEND)
        pytest.fail(f"{request.node.nodeid} left backend {left!r} active; this run tests "
                    f"{RUN_BACKEND!r} (MINILORA_BACKEND): restore it (with B.backend(name): ...)",
                    pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """Under strict, fail the run when too few of its device tests did device work."""
    if WORK.enforced and not WORK.enough(DEVICE_WORK_MIN) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The device-work count, and under strict the tests that did none."""
    for line in WORK.summary(DEVICE_WORK_MIN):
        terminalreporter.write_line(line)
