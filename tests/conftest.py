import fnmatch
import os
import sys
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from resnet_demo.core.model import ResNetConfig, build_model  # noqa: E402
from resnet_demo.tools.loadtest import free_port  # noqa: E402, F401 - the one free_port; tests import it from here

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TINY = ResNetConfig(widths=(8, 16), blocks=(2, 1), name="tiny")
TINY_PROJ = ResNetConfig(widths=(8, 16), blocks=(2, 1), downsample="projection", name="tiny-proj")


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so eval-mode logits test them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return randomise_bn(build_model(TINY))


@pytest.fixture(scope="session")
def seed_model():
    torch.manual_seed(0)
    return randomise_bn(build_model())


# --- the fast loop -----------------------------------------------------------------------------------------
#
# `python -m pytest -m "not slow"` is the fast loop (3 minutes at most on the project's 2-core machine, busy);
# plain `python -m pytest` (what CI runs) runs everything. Slow, besides what a file marks itself:
# - every browser test (a Chromium, and real page updates to wait for);
# - every test on the app's real server (a start costs seconds; the fast loop starts none);
# - the tests named in SLOW below.

SERVER_FIXTURES = frozenset({"app_server", "app_servers", "own_app_server"})

# Over ~1.5 s each (setup and call) on the 2-core machine while other work ran on it (load average 8 to 20;
# measured with --durations): the module's name -> fnmatch patterns on the test's name (a bare name covers
# all its parameters). One table rather than decorators scattered over 27 files, so the fast loop's
# boundary is read and changed in one place; a pattern that matches no collected test is reported as a warning.
SLOW: dict[str, tuple[str, ...]] = {
    "test_blocks": ("test_timm_resnet_blocks_recombine",
                    "test_timm_resnetv2_blocks_recombine",
                    "test_torchvision_and_project_blocks_recombine",
                    "test_transformers_blocks_recombine"),
    "test_budget": ("test_a_smaller_batch_to_fit_the_budget_gives_the_same_results",
                    "test_a_study_captures_only_the_parts_it_uses",
                    "test_lesion_and_error_scans_record_nothing",
                    "test_the_estimate_is_the_block_shapes_times_the_bytes",
                    "test_the_largest_activation_may_be_outside_every_block",
                    "test_the_module_budget_applies_to_every_study"),
    "test_capture": ("test_a_capture_keeps_only_the_parts_asked_for",
                     "test_a_reduced_capture_holds_only_the_reduction",
                     "test_a_scaled_branch_is_alpha_times_f_and_alpha_0_and_1_are_the_lesion_and_the_intact_model",
                     "test_bad_scales_are_refused_with_a_reason",
                     "test_captured_tensors_are_copies_not_views",
                     "test_captures_every_block_with_y_equal_relu_f_plus_s",
                     "test_lesion_nothing_gives_intact_logits_and_lesion_equals_hand_forward",
                     "test_logits_identical_with_and_without_capture",
                     "test_metrics_equal_a_hand_computation",
                     "test_threads_capturing_different_inputs_get_their_own_results"),
    "test_capture_libraries": ("test_a_lesion_leaves_the_shortcut_alone",
                               "test_capture_leaves_logits_bit_identical_and_every_record_recombines"),
    "test_checkpoints": ("test_a_3x3_stem_without_a_max_pool_is_recognised_as_cifar_style_not_as_torchvisions",
                         "test_a_checkpoint_of_something_else_gets_the_same_grammatical_sentence",
                         "test_a_good_checkpoint_becomes_the_same_model_and_card_by_either_route",
                         "test_a_stem_that_does_not_suit_the_chosen_size_is_said",
                         "test_a_timm_style_training_checkpoint_gives_up_its_state_dict",
                         "test_arch_and_classes_are_the_same_override_by_either_route",
                         "test_nan_weights_and_class_names_that_do_not_fit_get_the_same_sentence",
                         "test_the_block_count_is_the_files_not_the_architecture_asked_for",
                         "test_the_default_preset_is_the_one_the_checkpoint_points_to",
                         "test_the_max_pool_is_an_override_on_either_route",
                         "test_the_published_torchvision_weights_need_the_explicit_flag",
                         "test_the_pytorch_tutorials_general_checkpoint_gives_up_its_state_dict",
                         "test_two_uploads_called_model_safetensors_have_distinct_names",
                         "test_wrong_shapes_get_the_same_sentence"),
    "test_errorscan": ("test_concurrent_scans_and_lesioned_captures_on_one_model_do_not_disturb_each_other",),
    "test_exemplars": ("test_a_corrupted_byte_inside_the_archive_is_refused",
                       "test_a_saved_file_loads_back_identical",
                       "test_a_shipped_model_reads_its_stored_file",
                       "test_another_model_is_scanned_on_demand_once_with_progress",
                       "test_bad_requests_are_refused_with_the_reason",
                       "test_crops_follow_the_receptive_field_geometry",
                       "test_the_exemplar_grid_shows_each_crop_enlarged_and_a_negative_row_for_f",
                       "test_the_loader_refuses_a_missing_corrupt_or_stale_file",
                       "test_the_scan_is_the_same_in_any_batch_size_and_through_a_single_process_dist",
                       "test_the_scan_keeps_the_k_extreme_images_of_every_channel"),
    "test_families": ("test_a_lightning_checkpoint_of_a_timm_model_under_net_with_a_loss_beside_it",
                      "test_a_lightning_checkpoint_of_torchvision_resnet18_under_model",
                      "test_a_lightning_model_that_fits_nothing_says_where_it_sits",
                      "test_a_timm_config_beside_the_weights_names_the_model_and_its_labels",
                      "test_a_timm_file_without_config_is_recognised_and_built_by_timm",
                      "test_a_transformers_folder_opens_with_its_config_labels_and_preprocessing",
                      "test_kuangliu_resnet18_opens_as_torchvision_blocks_with_its_logits",
                      "test_timm_variants_open_from_a_pth",
                      "test_transformers_weights_alone_get_a_config_inferred_from_their_shapes"),
    "test_featurevis": ("test_a_grey_model_gets_a_grey_image",
                        "test_the_cache_is_keyed_by_model_block_view_channel_and_seed",
                        "test_the_model_keeps_no_hook_gradient_mode_or_flag_change",
                        "test_the_panel_and_the_map_pictures",
                        "test_the_same_seed_gives_the_same_image_and_another_seed_another"),
    "test_fuzz": ("test_load_image_on_arbitrary_bytes",
                  "test_load_image_on_mutated_images",
                  "test_read_checkpoint_on_arbitrary_bytes",
                  "test_read_checkpoint_on_bytes_behind_a_valid_magic",
                  "test_read_checkpoint_on_generated_safetensors_headers",
                  "test_read_checkpoint_on_mutated_checkpoints",
                  "test_recognise_on_perturbed_state_dicts"),
    "test_hardening": ("test_1x1_image_gives_a_valid_prediction",
                       "test_limits_are_set",
                       "test_nan_and_infinite_pixels_give_finite_logits",
                       "test_the_animated_gif_is_its_first_frame_not_another",
                       "test_the_size_check_runs_before_decoding_at_any_declared_size",
                       "test_truncated_safetensors_with_its_card_fails_the_checksum",
                       "test_unusual_modes_give_the_result_of_their_8bit_equivalent",
                       "test_weights_of_another_architecture"),
    "test_hub": ("test_a_file_larger_than_the_hub_said_is_stopped_mid_download",
                 "test_a_pickle_is_taken_only_without_safetensors_and_read_weights_only",
                 "test_a_timm_model_by_name_is_downloaded_once_cached_and_opened_with_its_config",
                 "test_a_transformers_model_by_name_takes_its_labels_and_preprocessing"),
    "test_hub_page": ("test_hub_on_the_command_line_is_loaded_at_start_and_failures_keep_their_sentence",
                      "test_the_command_line_and_the_page",
                      "test_the_pages_hub_box_adds_a_session_model_and_no_hub_refuses",
                      "test_weights_with_a_config_beside_and_an_upload_with_its_config_open_as_timm_says"),
    "test_inside": ("test_blocks_it_cannot_read_are_refused_saying_why[[]timm seresnet18-*",
                    "test_every_step_recombines_to_the_captured_block",
                    "test_relu_cut_and_the_shortcut_share_match_a_hand_computation[[]resnet18]",
                    "test_relu_cut_and_the_shortcut_share_match_a_hand_computation[[]resnet50]",
                    "test_relu_cut_and_the_shortcut_share_match_a_hand_computation[[]tiny-proj]",
                    "test_relu_cut_and_the_shortcut_share_match_a_hand_computation[[]tutorial]",
                    "test_the_decomposition_is_exact_in_float64",
                    "test_the_figure_shows_every_step_and_maps_a_click_to_a_position",
                    "test_the_layers_are_read_from_the_block",
                    "test_the_same_inside_inference_mode",
                    "test_the_sentence_gives_the_shortcut_share_as_a_learner_reads_it",
                    "test_two_threads_at_once_get_their_own_results"),
    "test_inside_page": ("test_a_tile_click_opens_the_tiles_channel",
                         "test_the_export_holds_inside_json_once_the_view_was_opened",
                         "test_the_views_numbers_are_a_direct_computations"),
    "test_insight": ("test_a_lesion_in_one_thread_leaves_another_threads_forward_intact",
                     "test_bands_command_writes_the_card_and_keeps_the_weights",
                     "test_compute_bands_over_a_synthetic_batch",
                     "test_describe_names_only_unusual_blocks",
                     "test_export_round_trip",
                     "test_export_writes_non_finite_numbers_as_strings",
                     "test_gradcam_at_the_last_block_equals_the_closed_form",
                     "test_gradcam_has_the_input_size_is_non_negative_and_leaves_no_trace",
                     "test_gradcam_in_concurrent_threads_matches_serial",
                     "test_gradcam_is_min_max_normalised_where_its_minimum_is_above_zero",
                     "test_gradcam_refuses_bad_arguments_and_works_under_inference_mode",
                     "test_graded_lesion_runs_from_the_lesion_at_alpha_0_to_the_intact_model_at_alpha_1",
                     "test_lesion_equals_a_hand_built_forward_with_the_branch_removed",
                     "test_lesion_sweep_lesions_each_block_alone_and_charts",
                     "test_lesioning_no_block_gives_the_intact_logits_exactly",
                     "test_readout_from_records_and_from_an_analysis_agree",
                     "test_readout_of_the_last_block_equals_the_models_logits",
                     "test_torchvision_resnet18_lesion_readout_and_gradcam"),
    "test_labelled": ("test_a_member_whose_header_lies_about_its_size_is_refused_while_reading",
                      "test_a_zip_bomb_of_50_mb_of_zeros_is_refused_before_it_is_inflated",
                      "test_nothing_is_left_on_disk",
                      "test_the_zip_reader_on_mutated_archives"),
    "test_metrics_projection": ("test_lesion_of_a_resnet18_projection_block_equals_hand_forward",
                                "test_lesion_of_the_tiny_proj_projection_block_equals_hand_forward",
                                "test_project_resnet_records_are_its_activations_torchvision_records_are_copies",
                                "test_resnet18_projection_block_captured_alone",
                                "test_resnet18_projection_block_records_and_metrics_equal_hand_computation",
                                "test_tiny_proj_projection_block_records_and_metrics_equal_hand_computation"),
    "test_model": ("test_a_card_less_checkpoint_of_another_config_is_recognised_not_refused",
                   "test_missing_key_is_named_in_the_tutorials_terms",
                   "test_output_shapes[[]config0-*",
                   "test_safetensors_round_trip_keeps_bn_statistics_in_fp32",
                   "test_shape_mismatch_names_key_and_shapes",
                   "test_tutorial_checkpoint_loads_with_identical_logits",
                   "test_wrong_architecture_is_refused"),
    "test_preprocess": ("test_photo_is_normalised_with_the_cards_mean_and_std",),
    "test_probes": ("test_block_features_are_the_pooled_outputs_and_the_head",
                    "test_fit_probe_standardises_separates_and_repeats_exactly",
                    "test_probes_command_on_a_tiny_model_writes_the_probes_and_the_card_only",
                    "test_the_last_blocks_probe_reads_the_class_as_well_as_the_head"),
    "test_readout_libraries": ("test_a_saved_card_of_a_library_model_reloads_with_the_same_logits",
                               "test_resnetv2s_head_applies_its_final_norm",
                               "test_the_last_blocks_readout_is_the_models_logits"),
    "test_recognise": ("test_a_torchvision_resnet_with_one_input_channel_end_to_end",
                       "test_a_whole_pickled_model_is_refused_with_how_to_save_a_state_dict",
                       "test_every_torchvision_arch_is_recognised_from_its_shapes",
                       "test_resnet18_with_5_classes_end_to_end",
                       "test_the_projects_resnet_end_to_end_from_safetensors",
                       "test_the_tutorials_net_end_to_end"),
    "test_scans": ("test_alpha_chart_draws_one_line_per_block_and_marks_alpha_one",
                   "test_every_count_equals_a_full_forward_pass_with_the_block_scaled",
                   "test_resuming_from_a_blocks_kept_input_gives_the_full_passes_logits_bit_for_bit",
                   "test_scan_command_writes_the_card_and_keeps_the_weights",
                   "test_the_no_lesion_row_is_the_per_class_accuracy"),
    "test_similarity": ("test_a_model_against_itself_has_ones_on_the_diagonal_and_is_symmetric",
                        "test_a_study_over_the_budget_is_refused_before_it_starts",
                        "test_block_similarity_feeds_b_as_the_page_does",
                        "test_block_similarity_with_one_batch_is_the_unbiased_cka_of_the_set",
                        "test_each_model_gets_what_the_page_gives_it_for_the_same_image",
                        "test_the_shipped_evaluation_sets_feed_the_models_as_they_were_trained",
                        "test_the_study_keeps_only_the_gram_matrices_of_the_block_outputs"),
    "test_strange": ("test_an_analysed_noise_image_gets_the_warning",
                     "test_noise_is_stranger_than_every_test_image_median",
                     "test_strange_command_on_a_tiny_model_writes_the_card_only",
                     "test_the_page_warns_for_noise_and_not_for_a_test_photo"),
    "test_torchvision": ("test_capture_gives_pre_add_branch_and_true_shortcut",
                         "test_card_beside_weights_loads_through_load_model",
                         "test_checkpoint_without_num_batches_tracked_loads",
                         "test_download_opt_in_uses_torchvision_published_weights",
                         "test_every_supported_arch_is_recognised_from_its_keys_and_shapes",
                         "test_explorer_analyses_a_photo_with_resnet18",
                         "test_fine_tune_with_other_class_count",
                         "test_lesion_on_torchvision_block_leaves_relu_of_shortcut",
                         "test_nothing_is_downloaded_without_opt_in",
                         "test_resnet50_has_16_bottlenecks_in_stages_3_4_6_3",
                         "test_right_layout_with_nan_values_is_refused",
                         "test_safetensors_file_round_trips",
                         "test_state_dict_file_round_trips",
                         "test_wrong_arch_names_both_and_suggests_the_right_one"),
    "test_train": ("test_a_few_steps_on_the_cpu_lower_the_loss",
                   "test_evalset_rebuilds_from_the_shared_archive",
                   "test_normalise_replicates_gray_and_standardises",
                   "test_same_seed_same_history_other_seed_differs",
                   "test_shipped_weights_are_what_their_card_says",
                   "test_train_cli_writes_weights_and_a_card_that_round_trips",
                   "test_training_modules_do_not_import_gradio",
                   "test_training_saves_a_timeline_whose_cards_hold_the_step_and_the_snapshots_own_accuracy"),
}


def _slow_by_name(item: pytest.Item) -> str | None:
    """The SLOW pattern that names ``item``, if any."""
    for pattern in SLOW.get(item.path.stem, ()):
        if fnmatch.fnmatchcase(item.name, pattern) or fnmatch.fnmatchcase(item.name, pattern + "[[]*"):
            return pattern
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(config, items):
    used = set()
    for item in items:
        pattern = _slow_by_name(item)
        if pattern is not None:
            used.add((item.path.stem, pattern))
        if (pattern is not None or item.get_closest_marker("browser") is not None
                or SERVER_FIXTURES.intersection(item.fixturenames)):
            item.add_marker(pytest.mark.slow)
    # A renamed test would silently join the fast loop: say so when its whole file was collected.
    whole = set()
    if not config.option.keyword and not any("::" in arg for arg in config.args):
        whole = {item.path.stem for item in items}
    stale = [f"{m}: {p}" for m in whole & SLOW.keys() for p in SLOW[m] if (m, p) not in used]
    if stale:
        warnings.warn(pytest.PytestWarning(f"conftest.SLOW names no collected test: {stale}"), stacklevel=1)


def drawing_area(page) -> tuple[float, float, float]:
    """The Draw tab of a Playwright ``page`` opened with the brush chosen: ``(left, top, side)`` of its drawing area
    in page pixels, for strokes given in fractions of the side."""
    import re

    from playwright.sync_api import expect

    page.get_by_role("tab", name="Draw").click()
    canvas = page.locator("#sketchpad canvas").first
    expect(canvas).to_be_visible(timeout=30_000)
    brush = page.locator('#sketchpad button[aria-label="Brush"]')
    expect(brush).to_be_visible(timeout=30_000)
    # The app selects the brush 150 ms after the tab opens; on a cold page the editor can render later than that
    # (seen: 1.8 s), leaving no tool chosen ("select the draw tool to start"). Pick it as a person would.
    page.wait_for_timeout(500)
    if "highlight" not in (brush.get_attribute("class") or ""):
        brush.click()
    expect(brush).to_have_class(re.compile(r"\bhighlight\b"))
    # The 280 x 280 drawing area sits in the middle of the editor's canvas, at about its own size.
    box = canvas.bounding_box()
    side = min(box["width"], box["height"]) * 0.8
    return box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2, side


# --- the app's real server, shared ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AppServer:
    """A running app: its URL, and the registry it serves from (the library's answers to compare with)."""

    url: str
    registry: object

    def client(self):
        """A new gradio_client session on this server: each Client is a page (a session) of its own."""
        from gradio_client import Client

        return Client(self.url, verbose=False)


class AppServers:
    """The app's servers in this process, one per variant, each started on first use and closed at the end.

    A variant is uploaded models on or off and a weights folder (default: the shipped weights when both
    are there, else untrained ones written once to a temporary folder). Each start costs seconds, so every
    test file asking for the same variant gets the same server; state that must not be shared (a page's
    analysis, an uploaded model) lives in the gradio session, one per :meth:`AppServer.client`.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._stack = ExitStack()
        self._running: dict[tuple[bool, Path], AppServer] = {}
        self._weights: Path | None = None

    @property
    def weights(self) -> Path:
        if self._weights is None:
            from appserver import weights_dir

            self._weights = weights_dir(self._tmp.mktemp("weights"))
        return self._weights

    def get(self, *, uploads: bool = True, weights: Path | None = None) -> AppServer:
        from appserver import running_app

        key = (uploads, Path(weights or self.weights).resolve())
        if key not in self._running:
            url, registry = self._stack.enter_context(running_app(key[1], uploads=uploads))
            self._running[key] = AppServer(url, registry)
        return self._running[key]

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def app_servers(tmp_path_factory):
    """The factory: ``app_servers.get(uploads=False)``, ``app_servers.get(weights=folder)``."""
    servers = AppServers(tmp_path_factory)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="session")
def app_server(app_servers) -> AppServer:
    """The app as it ships: uploaded models on, the default weights."""
    return app_servers.get()


@pytest.fixture
def own_app_server(app_servers):
    """A server for this test alone (it serves the test's own runs, or is launched its own way), closed after it:
    ``own_app_server(timelines=...)``, ``own_app_server(state_session_capacity=2)``; the arguments are
    :func:`appserver.running_app`'s, the weights by default the shared servers'."""
    from appserver import running_app

    with ExitStack() as stack:

        def start(weights: Path | None = None, **kwargs) -> AppServer:
            url, registry = stack.enter_context(running_app(weights or app_servers.weights, **kwargs))
            return AppServer(url, registry)

        yield start
