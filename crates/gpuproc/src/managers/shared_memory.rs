//! [`SharedMemoryManager`]: Python's `multiprocessing.managers.SharedMemoryManager`, a
//! manager process that creates named shared memory blocks and unlinks every one when it
//! stops.

use super::proxy::{unexpected, Proxy, DEFAULT_TIMEOUT};
use super::wire::{Reply, Request};
use super::{Manager, ManagerError};
use crate::shm::{Item, ShareableList, SharedMemory};
use crate::StartMethod;

/// A manager process that creates named [`SharedMemory`] blocks and [`ShareableList`]s,
/// and unlinks all of them when it is shut down, dropped, or dies; Python's
/// `SharedMemoryManager`.
///
/// The blocks belong to the manager process: the handles it gives back are attached to
/// them (dropping one does not unlink the block). [`shutdown`](Self::shutdown) (or
/// dropping the manager) unlinks every block before it returns. A manager that is killed
/// (SIGKILL included) has its blocks unlinked by its resource tracker once it is gone (see
/// [`SharedMemory`], "Resource tracker"): the manager is always started with
/// [`StartMethod::Spawn`], so that its tracker is its own and not shared with this
/// process.
///
/// ```
/// # gpuproc::init();
/// use gpuproc::managers::SharedMemoryManager;
///
/// let mut smm = SharedMemoryManager::start()?;
/// let block = smm.shared_memory(128)?;
/// block.write_at(0, b"hello");
/// let list = smm.shareable_list([1i64, 2, 3])?;
/// let name = block.name().to_string();
/// smm.shutdown(); // both are unlinked
/// assert!(gpuproc::shm::SharedMemory::attach(&name).is_err());
/// # drop(list);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SharedMemoryManager {
    manager: Manager,
}

impl SharedMemoryManager {
    /// Starts the manager process; Python's `SharedMemoryManager()` and `start()`.
    pub fn start() -> Result<SharedMemoryManager, ManagerError> {
        let manager = Manager::builder()
            .start_method(StartMethod::Spawn)
            .start()?;
        Ok(SharedMemoryManager { manager })
    }

    /// A new named block of `size` bytes (zero-filled), owned by the manager; Python's
    /// `smm.SharedMemory(size)`.
    pub fn shared_memory(&self, size: usize) -> Result<SharedMemory, ManagerError> {
        let name = self.ask(Request::NewBlock { size: size as u64 })?;
        SharedMemory::attach(&name).map_err(|e| ManagerError::Refused {
            reason: format!("attaching the new block {name:?}: {e}"),
        })
    }

    /// A new [`ShareableList`] of `items`, owned by the manager; Python's
    /// `smm.ShareableList(sequence)`.
    pub fn shareable_list<I: Into<Item>>(
        &self,
        items: impl IntoIterator<Item = I>,
    ) -> Result<ShareableList, ManagerError> {
        self.list(items, 0)
    }

    /// [`shareable_list`](Self::shareable_list) with room for strings and bytes of up to
    /// `capacity` bytes in each slot (see [`ShareableList::with_capacity`]).
    pub fn shareable_list_with_capacity<I: Into<Item>>(
        &self,
        items: impl IntoIterator<Item = I>,
        capacity: usize,
    ) -> Result<ShareableList, ManagerError> {
        self.list(items, capacity.max(1))
    }

    fn list<I: Into<Item>>(
        &self,
        items: impl IntoIterator<Item = I>,
        capacity: usize,
    ) -> Result<ShareableList, ManagerError> {
        let items: Vec<Item> = items.into_iter().map(Into::into).collect();
        let name = self.ask(Request::NewShareableList {
            items,
            capacity: capacity as u64,
        })?;
        ShareableList::attach(&name).map_err(|e| ManagerError::Refused {
            reason: format!("attaching the new list {name:?}: {e}"),
        })
    }

    fn ask(&self, req: Request) -> Result<String, ManagerError> {
        match self.proxy().call(req)? {
            Reply::Name(name) => Ok(name),
            other => Err(unexpected(other)),
        }
    }

    fn proxy(&self) -> Proxy {
        Proxy::new(self.manager.endpoint.clone(), 0, DEFAULT_TIMEOUT)
    }

    /// The manager: it serves everything a [`Manager`] does too (Python's
    /// `SharedMemoryManager` is a `SyncManager`).
    pub fn manager(&self) -> &Manager {
        &self.manager
    }

    /// The manager process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.manager.pid()
    }

    /// Unlinks every block the manager made, then stops it; Python's `shutdown()`.
    /// Calling it again does nothing. If the manager does not answer (it was killed), its
    /// resource tracker unlinks the blocks.
    pub fn shutdown(&mut self) {
        if self.manager.pid().is_some() {
            let _ = self.proxy().call(Request::UnlinkAll);
        }
        self.manager.shutdown();
    }
}

impl Drop for SharedMemoryManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}
