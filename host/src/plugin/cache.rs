//! The compiled-component cache, bounded by entries and bytes (LRU).

use wasmtime::component::Component;

/// The compiled-component cache: least recently used entries beyond
/// `max_entries` or `max_bytes` of compiled code are released (with their
/// memory images and memfds, once no upstream still runs them).
#[derive(Default)]
pub(super) struct ComponentCache {
    pub(super) entries: Vec<CacheEntry>,
    /// Sum of the entries' `bytes`.
    pub(super) bytes: usize,
    pub(super) clock: u64,
    pub(super) max_entries: usize,
    pub(super) max_bytes: usize,
    pub(super) metrics: Option<crate::metrics::ResourceMetrics>,
}

pub(super) struct CacheEntry {
    pub(super) digest: String,
    pub(super) component: Component,
    pub(super) bytes: usize,
    pub(super) used: u64,
}

impl ComponentCache {
    pub(super) fn get(&mut self, digest: &str) -> Option<Component> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.iter_mut().find(|e| e.digest == digest)?;
        entry.used = clock;
        Some(entry.component.clone())
    }

    pub(super) fn insert(&mut self, digest: String, component: Component) {
        self.clock += 1;
        let range = component.image_range();
        let bytes = (range.end as usize).saturating_sub(range.start as usize);
        if let Some(i) = self.entries.iter().position(|e| e.digest == digest) {
            self.bytes -= self.entries.swap_remove(i).bytes;
        }
        self.bytes += bytes;
        self.entries.push(CacheEntry {
            digest,
            component,
            bytes,
            used: self.clock,
        });
        self.evict();
    }

    /// Drop least recently used entries until within both bounds (the
    /// newest entry always stays).
    pub(super) fn evict(&mut self) {
        while self.entries.len() > 1
            && (self.entries.len() > self.max_entries || self.bytes > self.max_bytes)
        {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.bytes -= self.entries.swap_remove(oldest).bytes;
        }
        if let Some(m) = &self.metrics {
            m.plugin_cache_entries
                .set(i64::try_from(self.entries.len()).unwrap_or(i64::MAX));
            m.plugin_cache_bytes
                .set(i64::try_from(self.bytes).unwrap_or(i64::MAX));
        }
    }
}
