"""Fill the hidden-state cache from the service ahead of training (`dflash generate-offline`).

The cache is the one `dflash train` reads (same folder layout and key), so a later run with
`--on-missing raise` (or `skip`/`warn`) trains without any service, and a run with
`--on-missing generate` only asks the service for what is still missing. Samples already
cached are skipped, so an interrupted fill resumes where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dflash_core.config import GenerateOfflineConfig
from dflash_core.data.prepare import load_prepared
from dflash_core.wire.identity import fingerprint_from_info
from services.hidden_states.service_set import query_service_info
from services.trainer.batches import TokenRows
from services.trainer.cache import HiddenStateCache
from services.trainer.grpc_source import GrpcSource
from services.trainer.preflight import check_data_matches_verifier
from services.trainer.sources import SampleRequest

logger = logging.getLogger(__name__)

# Samples handed to the cache per round trip; the byte budget of the source bounds memory.
CHUNK = 32


@dataclass
class FillReport:
    cache_folder: Path
    already_cached: int
    written: int
    failed_writes: int

    def summary(self) -> str:
        return (
            f"hidden-state cache {self.cache_folder}: {self.written} sample(s) written, "
            f"{self.already_cached} already there"
            + (
                f", {self.failed_writes} could not be written (see the warning above)"
                if self.failed_writes
                else ""
            )
        )


def fill_cache(config: GenerateOfflineConfig) -> FillReport:
    dataset, data_meta = load_prepared(config.data_path)
    rows = TokenRows(dataset, max_length=config.total_seq_len)
    info = query_service_info(config.vllm_endpoint)
    served, fingerprint = list(info.layer_ids), fingerprint_from_info(info)
    check_data_matches_verifier(data_meta, fingerprint, data_path=config.data_path)
    layer_ids = config.target_layer_ids or [i for i in served if i != fingerprint.num_layers]

    cache = HiddenStateCache(
        config.hidden_states_cache or Path(config.data_path) / "hidden_states",
        fingerprint=fingerprint,
        target_layer_ids=layer_ids,
    )
    count = min(len(rows), config.max_samples or len(rows))
    todo = [i for i in range(count) if not cache.path_for(i).exists()]
    report = FillReport(
        cache_folder=cache.folder, already_cached=count - len(todo), written=0, failed_writes=0
    )
    logger.info("%d of %d samples to fetch into %s (layer ids %s)", len(todo), count, cache.folder, layer_ids)
    if not todo:
        return report
    source = GrpcSource.from_config(config, target_layer_ids=layer_ids, expected=fingerprint)
    try:
        requests = [SampleRequest(sample_id=i, input_ids=rows.get(i)[0]) for i in todo]
        source.prefetch(requests)  # the source's byte budget paces the service
        with tqdm(total=len(requests), unit="sample", desc="hidden states", disable=None) as bar:
            for start in range(0, len(requests), CHUNK):
                chunk = requests[start : start + CHUNK]
                for request, states in zip(chunk, source.extract(chunk), strict=True):
                    if cache.put(states, input_ids=request.input_ids):
                        report.written += 1
                    else:
                        report.failed_writes += 1
                bar.update(len(chunk))
                if not cache.writable:
                    break  # disk full or read-only: the warning says so; no point fetching more
    finally:
        source.close()
    return report
