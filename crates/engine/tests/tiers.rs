//! Expert tiers: the routing profile a run records, the background pre-warm that fills the RAM
//! tier hottest first from it (never evicting), the exclusive hand-over to an upper tier
//! (`take` / `admit`), and that none of it changes a logit.

use flashmoe::convert::{ConvertOptions, Target, convert};
use flashmoe::experts::{RoutingProfile, StoreOptions};
use flashmoe::runtime::ProfileSource;
use flashmoe::{LoadOptions, LogitsFor, Model};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const IDS: [u32; 9] = [1, 5, 77, 300, 12, 260, 3, 199, 42];

fn packed_tiny(tmp: &Path) -> PathBuf {
    // FLASHMOE_TESTDATA: where the fixtures are when this binary runs on another machine.
    let testdata = std::env::var_os("FLASHMOE_TESTDATA")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata"), PathBuf::from);
    let src = testdata.join("models/qwen35-moe-tiny");
    let dst = tmp.join("packed");
    let keep = ConvertOptions { expert: Target::Keep, other: Target::Keep, ..ConvertOptions::default() };
    convert(&src, &dst, &keep, &()).unwrap();
    dst
}

fn logits_of(m: &Model) -> Vec<f32> {
    let mut st = m.new_state();
    let mut out = m.forward(&IDS[..5], &mut st, LogitsFor::All).unwrap();
    for &id in &IDS[5..] {
        out.extend(m.forward(&[id], &mut st, LogitsFor::Last).unwrap());
    }
    out
}

fn load(dir: &Path, ram_experts: u64, profile: ProfileSource) -> Model {
    let stride = {
        let m = Model::load(dir).unwrap();
        m.expert_store().unwrap().expert_stride(0)
    };
    let opts = LoadOptions {
        store: StoreOptions { ram_cache_bytes: ram_experts * stride, ..Default::default() },
        routing_profile: profile,
        ..Default::default()
    };
    Model::load_with(dir, &opts).unwrap()
}

fn wait_prewarm(m: &Model) {
    let t = Instant::now();
    while m.prewarm_running() {
        assert!(t.elapsed() < Duration::from_secs(60), "pre-warm did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn recorded_profile_prewarms_the_ram_tier_hottest_first_without_changing_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_tiny(tmp.path());
    let m0 = load(&dir, 0, ProfileSource::Off);
    let reference = logits_of(&m0);
    let c = m0.config.clone();
    let store = m0.expert_store().unwrap();
    let profile = store.profile();
    // Every layer routed k experts for each of the 4 decode tokens, plus the prefill's.
    for (l, counts) in profile.counts.iter().enumerate() {
        let sum: u64 = counts.iter().sum();
        assert!(sum >= 4 * c.experts_per_token as u64, "layer {l}: {sum} uses counted");
        assert_eq!(counts.len(), c.num_experts);
    }
    let file = tmp.path().join("profile.json");
    profile.save(&file).unwrap();
    assert_eq!(RoutingProfile::load(&file, c.num_layers, c.num_experts).unwrap(), profile);
    drop(m0);

    let room = 5u64;
    let hottest = profile.hottest();
    assert!(hottest.len() as u64 > room, "the tiny run must use more experts than the tier holds");
    let m = load(&dir, room, ProfileSource::File(file.clone()));
    assert_eq!(m.prewarm_info().unwrap().ranked, hottest.len());
    wait_prewarm(&m);
    let store = m.expert_store().unwrap();
    // The `room` hottest (ties at the boundary broken either way).
    let count = |(l, e): (u32, u32)| profile.counts[l as usize][e as usize];
    let boundary = count(hottest[room as usize - 1]);
    let held: Vec<(u32, u32)> =
        hottest.iter().copied().filter(|&(l, e)| store.in_ram(l as usize, e as usize)).collect();
    assert_eq!(held.len() as u64, room);
    for &k in &hottest {
        if count(k) > boundary {
            assert!(held.contains(&k), "{k:?} (used {} times) is hotter than the boundary {boundary}", count(k));
        }
        if held.contains(&k) {
            assert!(count(k) >= boundary, "{k:?} (used {} times) is colder than the boundary {boundary}", count(k));
        }
    }
    assert_eq!(store.snapshot().prewarmed, room);
    // It read a batch (16 here) and kept the hottest; nothing else has read or hit yet.
    let io = store.snapshot();
    assert!(io.disk_reads >= room && io.ram_hits + io.ram_misses == 0, "{io:?}");
    // The run starts with hits, and computes the same bits.
    assert_eq!(logits_of(&m), reference);
    assert!(store.snapshot().ram_hits > 0);
}

/// A tier above that stops taking the pre-warm's experts after a few (it filled up with
/// on-demand loads first): the rest of its share goes to the RAM tier, read once, so no expert
/// of the ranking is left for a disk read on first use, except those the tier above already
/// took (exclusive tiers: one home each).
#[test]
fn prewarm_sends_to_ram_what_the_upper_tier_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_tiny(tmp.path());
    let m = load(&dir, 64, ProfileSource::Off);
    let store = m.expert_store().unwrap().clone();
    let c = m.config.clone();
    let keys: Vec<((u32, u32), f64)> =
        (0..c.num_experts as u32).map(|e| ((0, e), 100.0 - e as f64)).chain([((1, 0), 1.0), ((1, 1), 0.5)]).collect();
    let to_upper = c.num_experts.min(10);
    // The tier above loaded (0, 5) on its own before the pre-warm reached it: its home is up
    // there, so the pre-warm must not also put it in RAM.
    store.take(0, &[5]).unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel::<flashmoe::experts::store::PrewarmItem>(1);
    let taker = std::thread::spawn(move || {
        // Takes two, then goes away.
        let got: Vec<(u32, u32)> = (0..2).map(|_| rx.recv().unwrap().0).collect();
        drop(rx);
        got
    });
    let before = store.snapshot().disk_reads;
    store.start_prewarm(keys.clone(), Some(tx), to_upper).join().unwrap();
    let taken = taker.join().unwrap();
    assert_eq!(taken, [(0, 0), (0, 1)], "hottest first, in order");
    for &((l, e), _) in &keys {
        let in_ram = store.in_ram(l as usize, e as usize);
        if taken.contains(&(l, e)) || (l, e) == (0, 5) {
            assert!(!in_ram, "({l}, {e}) went up: not also in RAM");
        } else {
            // (At most one the reader sent into the channel before the taker left can be lost.)
            assert!(in_ram || e == 2, "({l}, {e}) is in neither tier");
        }
    }
    // Every key read at most once.
    let reads = store.snapshot().disk_reads - before;
    assert!(reads <= keys.len() as u64, "{reads} reads for {} keys", keys.len());
}

#[test]
fn prewarm_never_evicts_what_the_run_brought_in() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_tiny(tmp.path());
    let m = load(&dir, 3, ProfileSource::Off);
    let store = m.expert_store().unwrap().clone();
    store.fetch(0, &[7, 6, 5]).unwrap();
    // Never used in the profile: they cannot displace what the run uses.
    let keys: Vec<((u32, u32), f64)> = (0..4).map(|e| ((1, e), 0.0)).collect();
    store.start_prewarm(keys, None, 0).join().unwrap();
    assert!((5..8).all(|e| store.in_ram(0, e)), "the run's experts stayed");
    assert!((0..4).all(|e| !store.in_ram(1, e)), "a full tier takes no pre-warm");
    assert_eq!(store.snapshot().prewarmed, 0);
}

#[test]
fn take_and_admit_keep_an_expert_in_one_tier() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_tiny(tmp.path());
    let m = load(&dir, 4, ProfileSource::Off);
    let store = m.expert_store().unwrap();
    store.fetch(0, &[1]).unwrap();
    assert!(store.in_ram(0, 1));
    let reads = store.snapshot().disk_reads;
    // From RAM: it leaves the RAM tier. From disk: read, and not added.
    let got = store.take(0, &[1, 2]).unwrap();
    assert_eq!(got.iter().map(|(_, from_ram)| *from_ram).collect::<Vec<_>>(), [true, false]);
    assert!(!store.in_ram(0, 1) && !store.in_ram(0, 2));
    assert_eq!(store.snapshot().disk_reads, reads + 1);
    assert_eq!(store.snapshot().ram_taken, 1);
    // Evicted from the tier above: back into RAM, with the same bytes a fresh read gives.
    let mut buf = store.expert_buffer(0);
    let n = store.blob_bytes(0);
    buf.as_mut_slice()[..n].copy_from_slice(&flashmoe::weights::store::ByteSource::bytes(&*got[0].0)[..n]);
    assert!(store.admit(0, 1, buf));
    assert!(store.in_ram(0, 1));
    let again = store.fetch(0, &[1]).unwrap();
    assert_eq!(store.snapshot().disk_reads, reads + 1, "served from RAM");
    let a = flashmoe::weights::store::ByteSource::bytes(&*again[0]);
    let b = flashmoe::weights::store::ByteSource::bytes(&*got[0].0);
    assert_eq!(a[..n], b[..n]);
}

#[test]
fn borrow_leaves_ram_hits_in_place_and_does_not_keep_disk_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_tiny(tmp.path());
    let m = load(&dir, 4, ProfileSource::Off);
    let store = m.expert_store().unwrap();
    store.fetch(0, &[1]).unwrap();
    let before = store.snapshot();
    // From RAM: handed out and still there. From disk: read, and not added.
    let got = store.borrow(0, &[1, 2]).unwrap();
    assert_eq!(got.iter().map(|(_, from_ram)| *from_ram).collect::<Vec<_>>(), [true, false]);
    assert!(store.in_ram(0, 1) && !store.in_ram(0, 2));
    let after = store.snapshot();
    assert_eq!(after.disk_reads, before.disk_reads + 1);
    assert_eq!(after.ram_taken, before.ram_taken, "nothing left the RAM tier");
    let fresh = store.fetch(0, &[2]).unwrap();
    let n = store.blob_bytes(0);
    let a = flashmoe::weights::store::ByteSource::bytes(&*fresh[0]);
    let b = flashmoe::weights::store::ByteSource::bytes(&*got[1].0);
    assert_eq!(a[..n], b[..n]);
}

#[test]
fn a_saved_profile_of_another_model_is_a_clear_error_when_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_tiny(tmp.path());
    let file = tmp.path().join("other.json");
    RoutingProfile { counts: vec![vec![1; 3]; 2] }.save(&file).unwrap();
    let opts = LoadOptions { routing_profile: ProfileSource::File(file), ..Default::default() };
    let err = Model::load_with(&dir, &opts).err().expect("refused").to_string();
    assert!(err.contains("experts; the model has") || err.contains("has layer"), "{err}");
}

/// On a GPU: a pre-warm hands the hottest experts to the GPU cache between steps, the rest to
/// the RAM tier; exclusive tiers move experts between them; logits stay within the GPU
/// tolerance of the CPU's.
#[cfg(feature = "cuda")]
#[test]
fn gpu_prewarm_and_exclusive_tiers_keep_logits() {
    use flashmoe::backend::{DeviceChoice, DeviceOptions, GpuCache, GpuTuning, Hybrid};
    if let Err(e) = flashmoe::cuda::CudaDevice::open(0) {
        eprintln!("skipped: no GPU ({e})");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_tiny(tmp.path());
    let m0 = load(&dir, 0, ProfileSource::Off);
    let reference = logits_of(&m0);
    let file = tmp.path().join("profile.json");
    m0.expert_store().unwrap().profile().save(&file).unwrap();
    let k = m0.config.experts_per_token;
    let stride = m0.expert_store().unwrap().expert_stride(0);
    drop(m0);
    // 20 of the tiny model's 64 experts on the GPU: the hand-over channel (32) holds them all.
    let slots = 20;
    assert!(slots > 2 * k);
    for hybrid in [Hybrid::Off, Hybrid::Auto] {
        let gpu = GpuTuning { hybrid, exclusive: true, ..Default::default() };
        let device = DeviceOptions { device: DeviceChoice::Cuda(0), gpu_cache: GpuCache::Experts(slots), gpu };
        let opts = LoadOptions {
            store: StoreOptions { ram_cache_bytes: 6 * stride, ..Default::default() },
            routing_profile: ProfileSource::File(file.clone()),
            device,
            ..Default::default()
        };
        let m = Model::load_with(&dir, &opts).unwrap();
        assert_eq!(m.prewarm_info().unwrap().to_backend, slots);
        // Let the reader queue the GPU's share before the first step (a step's own misses
        // would otherwise take the free slots first; a pre-warm only fills free slots).
        let t = Instant::now();
        while m.expert_store().unwrap().snapshot().prewarmed < slots as u64 && m.prewarm_running() {
            assert!(t.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut st = m.new_state();
        m.forward(&IDS[..1], &mut st, LogitsFor::Last).unwrap();
        wait_prewarm(&m);
        let tier = m.tier().unwrap().counters;
        // The first step takes 4·(k+1) of them before its own misses claim free slots.
        let first = (4 * (k + 1)).min(slots) as u64;
        assert!(tier.prewarmed >= first, "{hybrid:?}: the GPU took {} pre-warmed experts", tier.prewarmed);
        let got = logits_of(&m);
        let max = reference.iter().fold(0f32, |a, x| a.max(x.abs()));
        let err = got.iter().zip(&reference).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(err <= 1e-3 * max, "{hybrid:?}: max |Δlogit| {err} vs max |logit| {max}");
        let io = m.expert_store().unwrap().snapshot();
        eprintln!("{hybrid:?}: {tier:?} | {io:?}");
        if hybrid == Hybrid::Off {
            assert!(tier.d2h_bytes > 0 && io.ram_admitted > 0, "evicted experts went back to RAM");
            assert!(io.ram_taken > 0, "RAM hits moved up to the GPU");
        }
    }
}

#[test]
fn without_a_profile_tiers_that_hold_every_expert_are_filled_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    // The profile this run saves at exit goes to the temporary cache folder, not the user's.
    // SAFETY: no other test of this binary reads or writes the environment.
    unsafe { std::env::set_var("FLASHMOE_HOME", tmp.path().join("home")) };
    let dir = packed_tiny(tmp.path());
    let reference = logits_of(&load(&dir, 0, ProfileSource::Off));
    let c = Model::load(&dir).unwrap().config.clone();
    let all = (c.num_layers * c.num_experts) as u64;

    // One expert short of the whole set: no ranking to choose by, so nothing is loaded.
    let m = load(&dir, all - 1, ProfileSource::Auto);
    assert!(m.prewarm_info().is_none());
    drop(m);
    let _ = std::fs::remove_dir_all(tmp.path().join("home"));

    let m = load(&dir, all, ProfileSource::Auto);
    let info = m.prewarm_info().expect("a pre-warm of every expert");
    assert_eq!((info.source.as_deref(), info.ranked), (None, all as usize));
    wait_prewarm(&m);
    let store = m.expert_store().unwrap();
    for l in 0..c.num_layers {
        for e in 0..c.num_experts {
            assert!(store.in_ram(l, e), "expert {e} of layer {l} not loaded");
        }
    }
    let before = store.snapshot();
    assert_eq!(before.prewarmed, all);
    assert_eq!(logits_of(&m), reference);
    let after = store.snapshot();
    assert_eq!(after.disk_reads, before.disk_reads, "the run read experts from disk after a full pre-warm");
    assert_eq!(after.ram_misses, 0);
}

/// Host memory from the heap under another name (a stand-in for a GPU's pinned memory).
struct Tagged;

impl flashmoe::experts::buffer::HostMemory for Tagged {
    fn alloc(&self, len: usize) -> Option<std::ptr::NonNull<u8>> {
        let layout = std::alloc::Layout::from_size_align(len, flashmoe::experts::buffer::BUF_ALIGN).ok()?;
        // SAFETY: non-zero size (the pool asks for at least 1 byte), valid alignment.
        std::ptr::NonNull::new(unsafe { std::alloc::alloc(layout) })
    }
    unsafe fn free(&self, p: std::ptr::NonNull<u8>, len: usize) {
        let layout = std::alloc::Layout::from_size_align(len, flashmoe::experts::buffer::BUF_ALIGN).unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(p.as_ptr(), layout) }
    }
    fn name(&self) -> &'static str {
        "tagged"
    }
}

#[test]
fn ram_tier_entries_move_into_host_memory_without_changing_a_logit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_tiny(tmp.path());
    let m = load(&dir, 64, ProfileSource::Off);
    let reference = logits_of(&m);
    let store = m.expert_store().unwrap();
    let before = store.fetch(0, &[1, 2]).unwrap();
    assert!(before.iter().all(|b| b.host_memory().is_none()), "heap buffers before");
    store.set_host_memory(std::sync::Arc::new(Tagged), false);
    // The background thread may move them first; moving what is left finds the rest.
    let t = Instant::now();
    while store.move_heap_entries(usize::MAX) > 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "entries never moved");
    }
    let after = store.fetch(0, &[1, 2]).unwrap();
    assert!(after.iter().all(|b| b.host_memory() == Some("tagged")), "entries now in host memory");
    let n = store.blob_bytes(0);
    for (a, b) in before.iter().zip(&after) {
        use flashmoe::weights::store::ByteSource;
        assert_eq!(a.bytes()[..n], b.bytes()[..n], "same bytes");
    }
    assert_eq!(logits_of(&m), reference);
}
