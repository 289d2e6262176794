//! Grant table version 1 (`public/grant_table.h`): granting our pages to a
//! peer (vchan servers) and mapping a peer's granted pages (vchan clients).
//!
//! The table's bookkeeping (a bounded free list of references, entry
//! encoding, revocation that refuses while the peer still maps the page) is
//! portable over [`SharedMemory`] and tested on the host; the hypercalls
//! that set up the frames and map foreign grants are thin wrappers. Grant
//! references and statuses from peers or Xen are checked, never trusted as
//! indices.
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;

use super::abi;
use super::hypercall;
use super::shared::{RawMemory, SharedMemory, barrier};

/// Why a grant operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantError {
    /// Every grant reference is in use.
    Exhausted,
    /// The reference is not one we handed out.
    NotGranted(u32),
    /// The peer still maps the page; it cannot be reclaimed yet.
    StillMapped(u32),
    /// Xen refused (negative errno or `GNTST_*` status).
    Xen(i64),
    /// No free slot in the window where foreign pages are mapped.
    NoMappingSlot,
}

/// Our grant table: `nr_entries` v1 entries in `mem`.
#[derive(Debug)]
pub struct GrantTable<M> {
    mem: M,
    free: Vec<u32>,
    in_use: Vec<bool>,
}

impl<M: SharedMemory> GrantTable<M> {
    /// Wraps table memory holding `mem.len() / 8` entries; the first
    /// [`abi::GNTTAB_NR_RESERVED_ENTRIES`] belong to the toolstack.
    pub fn new(mem: M) -> Self {
        let entries = (mem.len() / abi::GRANT_ENTRY_V1_SIZE) as u32;
        let free = (abi::GNTTAB_NR_RESERVED_ENTRIES..entries).rev().collect();
        GrantTable {
            mem,
            free,
            in_use: alloc::vec![false; entries as usize],
        }
    }

    /// References still free.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Grants `domid` access to our frame `gfn`; returns the reference.
    pub fn grant_access(
        &mut self,
        domid: u16,
        gfn: u64,
        readonly: bool,
    ) -> Result<u32, GrantError> {
        let gref = self.free.pop().ok_or(GrantError::Exhausted)?;
        let at = gref as usize * abi::GRANT_ENTRY_V1_SIZE;
        self.mem.store_u16(at + 2, domid);
        self.mem.store_u32(at + 4, gfn as u32);
        barrier(); // domid and frame before the flags make the entry valid
        let flags = abi::GTF_PERMIT_ACCESS | if readonly { abi::GTF_READONLY } else { 0 };
        self.mem.store_u16(at, flags);
        if let Some(slot) = self.in_use.get_mut(gref as usize) {
            *slot = true;
        }
        Ok(gref)
    }

    /// Revokes a grant. Refuses (and keeps the grant) while the peer maps
    /// the page: the page must then not be reused.
    pub fn end_access(&mut self, gref: u32) -> Result<(), GrantError> {
        if !self.in_use.get(gref as usize).copied().unwrap_or(false) {
            return Err(GrantError::NotGranted(gref));
        }
        let at = gref as usize * abi::GRANT_ENTRY_V1_SIZE;
        let mut flags = self.mem.load_u16(at);
        loop {
            if flags & (abi::GTF_READING | abi::GTF_WRITING) != 0 {
                return Err(GrantError::StillMapped(gref));
            }
            let found = self.mem.compare_exchange_u16(at, flags, 0);
            if found == flags {
                break;
            }
            flags = found;
        }
        if let Some(slot) = self.in_use.get_mut(gref as usize) {
            *slot = false;
        }
        self.free.push(gref);
        Ok(())
    }
}

/// Guest frame where our grant table frames are placed (a hole in the PVH
/// physical map, identity-mapped by boot.s).
pub const GRANT_TABLE_GPFN: u64 = 0x8_0000; // 2 GiB
/// Frames of grant table we set up (512 entries each).
pub const GRANT_TABLE_FRAMES: u64 = 4;
/// Guest frame of `shared_info`.
pub const SHARED_INFO_GPFN: u64 = GRANT_TABLE_GPFN + 64;
/// First guest frame of the window for mapping foreign grants.
pub const FOREIGN_WINDOW_GPFN: u64 = 0x9_0000; // 2.25 GiB
/// Frames in that window.
pub const FOREIGN_WINDOW_FRAMES: usize = 1024;

/// Maps our grant table frames and returns the table.
///
/// # Safety
/// Must be called once; the frames at [`GRANT_TABLE_GPFN`] must not be used
/// for anything else.
pub unsafe fn setup_table() -> Result<GrantTable<RawMemory>, GrantError> {
    for frame in 0..GRANT_TABLE_FRAMES {
        let rc = hypercall::add_to_physmap(
            abi::XENMAPSPACE_GRANT_TABLE,
            frame,
            GRANT_TABLE_GPFN + frame,
        );
        if rc != 0 {
            return Err(GrantError::Xen(rc));
        }
    }
    // SAFETY: Xen backs these frames with our grant table from now on; the
    // caller reserved them; all access goes through `RawMemory`.
    let mem = unsafe {
        RawMemory::new(
            (GRANT_TABLE_GPFN << 12) as *mut u8,
            (GRANT_TABLE_FRAMES as usize) * abi::PAGE_SIZE,
        )
    };
    Ok(GrantTable::new(mem))
}

/// A foreign page mapped into our window.
#[derive(Debug, Clone, Copy)]
pub struct ForeignMapping {
    /// Guest-physical address where it is mapped.
    pub addr: u64,
    /// Xen's handle, needed to unmap.
    pub handle: u32,
}

/// Bookkeeping of the foreign-mapping window.
#[derive(Debug)]
pub struct ForeignWindow {
    used: Vec<bool>,
}

impl Default for ForeignWindow {
    fn default() -> Self {
        ForeignWindow {
            used: alloc::vec![false; FOREIGN_WINDOW_FRAMES],
        }
    }
}

impl ForeignWindow {
    /// Finds `count` consecutive free frames; returns the first index.
    pub fn reserve(&mut self, count: usize) -> Option<usize> {
        if count == 0 {
            return None;
        }
        let start = (0..=self.used.len().checked_sub(count)?).find(|&s| {
            self.used
                .get(s..s + count)
                .is_some_and(|w| w.iter().all(|u| !u))
        })?;
        self.used
            .get_mut(start..start + count)?
            .iter_mut()
            .for_each(|u| *u = true);
        Some(start)
    }

    /// Frees `count` frames from `start`.
    pub fn release(&mut self, start: usize, count: usize) {
        if let Some(window) = self.used.get_mut(start..start.saturating_add(count)) {
            window.iter_mut().for_each(|u| *u = false);
        }
    }

    /// Guest-physical address of window frame `index`.
    pub fn addr(index: usize) -> u64 {
        (FOREIGN_WINDOW_GPFN + index as u64) << 12
    }
}

/// Maps grant `gref` of domain `dom` at guest-physical `addr`.
pub fn map_grant(
    dom: u16,
    gref: u32,
    addr: u64,
    readonly: bool,
) -> Result<ForeignMapping, GrantError> {
    let mut op = abi::GnttabMapGrantRef {
        host_addr: addr,
        flags: abi::GNTMAP_HOST_MAP | if readonly { abi::GNTMAP_READONLY } else { 0 },
        gref,
        dom,
        ..Default::default()
    };
    let rc = hypercall::grant_table_op(abi::GNTTABOP_MAP_GRANT_REF, &mut op);
    if rc != 0 {
        return Err(GrantError::Xen(rc));
    }
    if op.status != abi::GNTST_OKAY {
        return Err(GrantError::Xen(i64::from(op.status)));
    }
    Ok(ForeignMapping {
        addr,
        handle: op.handle,
    })
}

/// Unmaps `mappings` with `unmap` and frees the window frames `windows`
/// reserved for them, except the windows where some page could not be
/// unmapped: such a frame may still hold the peer's page, and mapping
/// another grant over it must never happen, so those frames stay reserved
/// (a leak of a few frames, which the caller logs). Returns the mappings
/// that failed, with Xen's error.
pub fn unmap_all(
    mappings: Vec<ForeignMapping>,
    windows: Vec<(usize, usize)>,
    window: &mut ForeignWindow,
    mut unmap: impl FnMut(ForeignMapping) -> Result<(), GrantError>,
) -> Vec<(ForeignMapping, GrantError)> {
    let mut failed = Vec::new();
    for mapping in mappings {
        if let Err(error) = unmap(mapping) {
            failed.push((mapping, error));
        }
    }
    for (start, count) in windows {
        let first = ForeignWindow::addr(start);
        let end = ForeignWindow::addr(start.saturating_add(count));
        if !failed.iter().any(|(m, _)| (first..end).contains(&m.addr)) {
            window.release(start, count);
        }
    }
    failed
}

/// Unmaps a foreign page.
pub fn unmap_grant(mapping: ForeignMapping) -> Result<(), GrantError> {
    let mut op = abi::GnttabUnmapGrantRef {
        host_addr: mapping.addr,
        handle: mapping.handle,
        ..Default::default()
    };
    let rc = hypercall::grant_table_op(abi::GNTTABOP_UNMAP_GRANT_REF, &mut op);
    if rc != 0 {
        return Err(GrantError::Xen(rc));
    }
    if op.status != abi::GNTST_OKAY {
        return Err(GrantError::Xen(i64::from(op.status)));
    }
    Ok(())
}

/// A run of bytes in a peer's granted page: its grant, where in the page,
/// how many.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub gref: u32,
    pub offset: u16,
    pub len: u16,
}

/// Most segments one batched grant copy moves: a packet's slots (netback
/// takes at most 18 from a client, a 64 KiB frame fills 17 RX buffers).
pub const MAX_COPY_SEGMENTS: usize = 18;
/// Most `gnttab_copy` ops one batch takes: a segment is at most a page, so
/// it crosses at most one page boundary of our buffer (two ops).
pub const MAX_COPY_OPS: usize = 2 * MAX_COPY_SEGMENTS;

/// Which way a batched grant copy moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    /// From the peer's pages into our buffer.
    FromPeer,
    /// From our buffer into the peer's pages.
    ToPeer,
}

/// Plans the `gnttab_copy` ops that move `segments` of domain `dom`'s
/// granted pages, in order, to or from consecutive bytes of our buffer at
/// guest-physical address `local` (`local_len` bytes, the segments' sum;
/// our memory is identity-mapped, so its frame is the address >> 12). An
/// op never leaves a page on either side: a segment is split where our
/// buffer crosses a page boundary. Empty segments take no op. Writes the
/// ops into `ops` and returns how many; `None` (nothing to copy) when a
/// segment runs past the end of its page, the lengths do not add up to
/// `local_len`, the buffer wraps the address space, or `ops` is too short.
pub fn plan_copy(
    dom: u16,
    segments: &[Segment],
    local: u64,
    local_len: usize,
    direction: CopyDirection,
    ops: &mut [abi::GnttabCopy],
) -> Option<usize> {
    let page = abi::PAGE_SIZE as u64;
    local.checked_add(local_len as u64)?;
    let mut at = local;
    let mut count = 0usize;
    let mut total = 0usize;
    for segment in segments {
        let len = usize::from(segment.len);
        if usize::from(segment.offset) + len > abi::PAGE_SIZE {
            return None;
        }
        total += len;
        if total > local_len {
            return None;
        }
        let mut done = 0u16;
        while done < segment.len {
            // Up to the end of our page (at most the rest of the segment).
            let room = page - at % page;
            let step = u64::from(segment.len - done).min(room) as u16;
            let mine = abi::GnttabCopyPtr {
                u: at >> 12,
                domid: abi::DOMID_SELF,
                offset: (at % page) as u16,
            };
            let theirs = abi::GnttabCopyPtr {
                u: u64::from(segment.gref),
                domid: dom,
                offset: segment.offset + done,
            };
            let op = ops.get_mut(count)?;
            *op = match direction {
                CopyDirection::FromPeer => abi::GnttabCopy {
                    source: theirs,
                    dest: mine,
                    len: step,
                    flags: abi::GNTCOPY_SOURCE_GREF,
                    status: 0,
                },
                CopyDirection::ToPeer => abi::GnttabCopy {
                    source: mine,
                    dest: theirs,
                    len: step,
                    flags: abi::GNTCOPY_DEST_GREF,
                    status: 0,
                },
            };
            count += 1;
            done += step;
            at += u64::from(step);
        }
    }
    (total == local_len).then_some(count)
}

/// How many `gnttab_copy` ops [`plan_copy`] makes for `segments` when
/// the first byte of our buffer lies `start` bytes into one of our pages:
/// one for each of our pages a (non-empty) segment touches.
pub fn copy_ops(segments: &[Segment], start: usize) -> usize {
    let page = abi::PAGE_SIZE;
    let mut at = start % page;
    let mut ops = 0usize;
    for segment in segments {
        let len = usize::from(segment.len);
        if len == 0 {
            continue;
        }
        ops += (at + len).div_ceil(page);
        at = (at + len) % page;
    }
    ops
}

/// Where in one of our pages a buffer for `segments` should start so that
/// their copy takes the fewest ops, and that many ops.
///
/// A client's large TCP packet comes as a few header bytes and then whole
/// pages of payload: copied to a buffer that starts on a page, every
/// payload page straddles two of ours and costs two ops; started where the
/// first payload page lands on a page boundary, one. The candidates are 0
/// and each start that puts a segment on a page boundary; the smallest
/// start wins a tie.
pub fn best_copy_start(segments: &[Segment]) -> (usize, usize) {
    let page = abi::PAGE_SIZE;
    let mut best = (0, copy_ops(segments, 0));
    let mut before = 0usize;
    for segment in segments {
        let start = (page - before % page) % page;
        let ops = copy_ops(segments, start);
        if ops < best.1 || (ops == best.1 && start < best.0) {
            best = (start, ops);
        }
        before += usize::from(segment.len);
    }
    best
}

#[allow(clippy::indexing_slicing)] // reason: test code and test doubles; a panic there is a failed test
#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::xen::shared::VecMemory;

    #[test]
    fn grants_are_encoded_as_grant_entry_v1() {
        let mem = VecMemory::new(4096);
        let mut table = GrantTable::new(mem.clone());
        assert_eq!(table.free_count(), 512 - 8);
        let gref = table.grant_access(7, 0x1234, false).unwrap();
        assert_eq!(gref, 8);
        let at = gref as usize * 8;
        assert_eq!(mem.load_u16(at), abi::GTF_PERMIT_ACCESS);
        assert_eq!(mem.load_u16(at + 2), 7);
        assert_eq!(mem.load_u32(at + 4), 0x1234);
        let ro = table.grant_access(0, 1, true).unwrap();
        assert_eq!(
            mem.load_u16(ro as usize * 8),
            abi::GTF_PERMIT_ACCESS | abi::GTF_READONLY
        );
    }

    #[test]
    fn a_mapped_grant_is_not_revoked_and_unknown_refs_are_refused() {
        let mem = VecMemory::new(4096);
        let mut table = GrantTable::new(mem.clone());
        let gref = table.grant_access(0, 5, false).unwrap();
        mem.fetch_or_u8(gref as usize * 8, abi::GTF_WRITING as u8); // Xen marks it mapped
        assert_eq!(table.end_access(gref), Err(GrantError::StillMapped(gref)));
        mem.fetch_and_u8(gref as usize * 8, !(abi::GTF_WRITING as u8));
        assert_eq!(table.end_access(gref), Ok(()));
        assert_eq!(mem.load_u16(gref as usize * 8), 0);
        assert_eq!(table.end_access(gref), Err(GrantError::NotGranted(gref)));
        assert_eq!(table.end_access(3), Err(GrantError::NotGranted(3)));
        assert_eq!(
            table.end_access(u32::MAX),
            Err(GrantError::NotGranted(u32::MAX))
        );
    }

    #[test]
    fn the_table_runs_out_cleanly() {
        let mut table = GrantTable::new(VecMemory::new(80)); // 10 entries, 8 reserved
        assert!(table.grant_access(0, 1, false).is_ok());
        assert!(table.grant_access(0, 2, false).is_ok());
        assert_eq!(table.grant_access(0, 3, false), Err(GrantError::Exhausted));
    }

    #[test]
    fn a_window_whose_page_stays_mapped_is_never_reused() {
        let mut window = ForeignWindow::default();
        let a = window.reserve(1).unwrap();
        let b = window.reserve(2).unwrap();
        let mapping = |frame: usize, handle: u32| ForeignMapping {
            addr: ForeignWindow::addr(frame),
            handle,
        };
        let mut unmapped = Vec::new();
        // The second page of window `b` cannot be unmapped.
        let failed = unmap_all(
            alloc::vec![mapping(a, 1), mapping(b, 2), mapping(b + 1, 3)],
            alloc::vec![(a, 1), (b, 2)],
            &mut window,
            |m| {
                unmapped.push(m.handle);
                if m.handle == 3 {
                    Err(GrantError::Xen(-1))
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(unmapped, [1, 2, 3], "every page is tried");
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0.handle, 3);
        // `a` is free again; `b` and `b + 1` are not handed out.
        assert_eq!(window.reserve(1), Some(a));
        let next = window.reserve(2).unwrap();
        assert!(next > b + 1, "window {b} reused: {next}");
        // All unmapped: everything is released.
        let failed = unmap_all(
            alloc::vec![mapping(next, 4), mapping(next + 1, 5)],
            alloc::vec![(next, 2)],
            &mut window,
            |_| Ok(()),
        );
        assert!(failed.is_empty());
        assert_eq!(window.reserve(2), Some(next));
    }

    fn seg(gref: u32, offset: u16, len: u16) -> Segment {
        Segment { gref, offset, len }
    }

    #[test]
    fn copies_are_planned_page_by_page_on_both_sides() {
        let mut ops = [abi::GnttabCopy::default(); MAX_COPY_OPS];
        // Our buffer starts 100 bytes before a page boundary: the first
        // segment is split there, the second lies in one page of ours, the
        // third is split again.
        let local = 0x12_3000 - 100;
        let segments = [seg(5, 10, 300), seg(6, 0, 4096), seg(7, 4000, 96)];
        let n = plan_copy(3, &segments, local, 4492, CopyDirection::FromPeer, &mut ops).unwrap();
        let ops = &ops[..n];
        let shape: Vec<_> = ops
            .iter()
            .map(|op| {
                (
                    op.source.u,
                    op.source.offset,
                    op.dest.u,
                    op.dest.offset,
                    op.len,
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (5, 10, 0x122, 4096 - 100, 100),
                (5, 110, 0x123, 0, 200),
                (6, 0, 0x123, 200, 3896),
                (6, 3896, 0x124, 0, 200),
                (7, 4000, 0x124, 200, 96),
            ]
        );
        for op in ops {
            assert_eq!(op.source.domid, 3);
            assert_eq!(op.dest.domid, abi::DOMID_SELF);
            assert_eq!(op.flags, abi::GNTCOPY_SOURCE_GREF);
            assert!(usize::from(op.dest.offset) + usize::from(op.len) <= abi::PAGE_SIZE);
            assert!(usize::from(op.source.offset) + usize::from(op.len) <= abi::PAGE_SIZE);
        }
        // The other way: the ends swap, the grant is the destination.
        let mut back = [abi::GnttabCopy::default(); MAX_COPY_OPS];
        let m = plan_copy(3, &segments, local, 4492, CopyDirection::ToPeer, &mut back).unwrap();
        assert_eq!(m, n);
        for (to, from) in back[..m].iter().zip(ops) {
            assert_eq!(
                (to.source, to.dest, to.len),
                (from.dest, from.source, from.len)
            );
            assert_eq!(to.flags, abi::GNTCOPY_DEST_GREF);
        }
    }

    #[test]
    fn bad_plans_copy_nothing() {
        let mut ops = [abi::GnttabCopy::default(); MAX_COPY_OPS];
        let dir = CopyDirection::FromPeer;
        // Past the end of the peer's page.
        assert_eq!(
            plan_copy(1, &[seg(1, 4000, 97)], 0x1000, 97, dir, &mut ops),
            None
        );
        assert_eq!(
            plan_copy(
                1,
                &[seg(1, u16::MAX, u16::MAX)],
                0x1000,
                65535,
                dir,
                &mut ops
            ),
            None
        );
        // Lengths that do not add up to the buffer.
        assert_eq!(
            plan_copy(1, &[seg(1, 0, 10)], 0x1000, 11, dir, &mut ops),
            None
        );
        assert_eq!(
            plan_copy(
                1,
                &[seg(1, 0, 10), seg(2, 0, 10)],
                0x1000,
                15,
                dir,
                &mut ops
            ),
            None
        );
        // A buffer wrapping the address space.
        assert_eq!(
            plan_copy(1, &[seg(1, 0, 10)], u64::MAX - 4, 10, dir, &mut ops),
            None
        );
        // Too few ops for the plan: a page-crossing segment needs two.
        assert_eq!(
            plan_copy(1, &[seg(1, 0, 10)], 0x1ffc, 10, dir, &mut ops[..1]),
            None
        );
        // Empty segments take no op; no segment at all is no op.
        assert_eq!(
            plan_copy(1, &[seg(1, 0, 0), seg(2, 0, 4)], 0x1000, 4, dir, &mut ops),
            Some(1)
        );
        assert_eq!(plan_copy(1, &[], 0x1000, 0, dir, &mut ops), Some(0));
        // The most segments, each a whole page off by one byte: every one
        // split, and the array is exactly big enough.
        let whole = [seg(9, 0, 4096); MAX_COPY_SEGMENTS];
        let len = MAX_COPY_SEGMENTS * 4096;
        assert_eq!(
            plan_copy(1, &whole, 0x10_0001, len, dir, &mut ops),
            Some(MAX_COPY_OPS)
        );
    }

    #[test]
    fn copy_ops_count_what_plan_copy_makes() {
        let dir = CopyDirection::FromPeer;
        let mut ops = [abi::GnttabCopy::default(); MAX_COPY_OPS];
        let layouts: [&[Segment]; 4] = [
            &[
                seg(1, 100, 66),
                seg(2, 3000, 1096),
                seg(3, 0, 4096),
                seg(4, 0, 4096),
                seg(5, 0, 900),
            ],
            &[seg(1, 0, 4096); MAX_COPY_SEGMENTS],
            &[
                seg(1, 0, 0),
                seg(2, 7, 1),
                seg(3, 0, 4095),
                seg(4, 0, 0),
                seg(5, 1, 4095),
            ],
            &[],
        ];
        for segments in layouts {
            let len: usize = segments.iter().map(|s| usize::from(s.len)).sum();
            for start in [0usize, 1, 66, 1000, 3030, 4095, 4096, 4097] {
                let local = 0x10_0000 + start as u64;
                let planned = plan_copy(1, segments, local, len, dir, &mut ops);
                assert_eq!(
                    planned,
                    Some(copy_ops(segments, start)),
                    "{segments:?} at {start}"
                );
            }
        }
    }

    #[test]
    fn the_best_start_puts_whole_payload_pages_on_ours() {
        // A 66-byte header, the rest of a page from 3000, then whole pages:
        // from a page boundary each whole page takes two ops.
        let mut segments = alloc::vec![seg(1, 100, 66), seg(2, 3000, 1096)];
        segments.extend([seg(3, 0, 4096); 14]);
        segments.push(seg(4, 0, 900));
        assert_eq!(copy_ops(&segments, 0), 1 + 1 + 14 * 2 + 1);
        // Started 4096 - 1162 bytes into a page, the whole pages line up
        // (the header and the partial page then share one of ours).
        let (start, ops) = best_copy_start(&segments);
        assert_eq!(start, 4096 - 66 - 1096);
        assert_eq!(ops, 1 + 1 + 14 + 1);
        assert_eq!(copy_ops(&segments, start), ops);
        // Already aligned, or nothing to gain: 0.
        assert_eq!(best_copy_start(&[seg(1, 0, 4096); 3]), (0, 3));
        assert_eq!(best_copy_start(&[seg(1, 0, 60)]), (0, 1));
        assert_eq!(best_copy_start(&[]), (0, 0));
        // No start can do better than one op per segment, none worse than
        // the start on a page boundary.
        let odd = [
            seg(1, 5, 3000),
            seg(2, 0, 2000),
            seg(3, 9, 4000),
            seg(4, 0, 10),
        ];
        let (start, ops) = best_copy_start(&odd);
        assert!(ops >= odd.len() && ops <= copy_ops(&odd, 0));
        assert_eq!(copy_ops(&odd, start), ops);
        assert!((0..4096).all(|s| copy_ops(&odd, s) >= ops));
    }

    #[test]
    fn the_foreign_window_reserves_contiguous_frames() {
        let mut window = ForeignWindow::default();
        assert_eq!(window.reserve(2), Some(0));
        assert_eq!(window.reserve(1), Some(2));
        window.release(0, 2);
        assert_eq!(window.reserve(3), Some(3));
        assert_eq!(window.reserve(2), Some(0));
        assert_eq!(window.reserve(0), None);
        assert_eq!(window.reserve(FOREIGN_WINDOW_FRAMES), None);
        window.release(usize::MAX, 5); // ignored
    }
}
