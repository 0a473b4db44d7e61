"""Ray Data adapters: reading shards and the manifest in a fixed order, the decoded-input cache, each training
rank's stream, and the CLIP-MoE's MCL batch plans. The stage drivers and the runner build on these."""
