"""Adapters: what one is, where a reference to one points, what produced it, and merging it into its base.

    info        what an adapter directory is (``adapter_config.json``, read without torch)
    resolve     the one resolver: a directory, registry id/name or job id -> the adapter, or
                ``AdapterNotFoundError`` (used by serve, eval, export, merge and `tunekit adapters`)
    provenance  the registry entry of a locally trained adapter (data, base, tokenizer, config, versions)
    merge       fold an adapter into its 16-bit base and check the merge (torch, loaded on call)

Nothing heavy is imported here: the submodules load torch/PEFT only inside the functions that need them.
"""
