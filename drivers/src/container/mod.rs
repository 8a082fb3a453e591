//! Container driver: namespaces + pivot_root + cgroup v2, CRIU for state.
use crate::*;

#[derive(Debug, Clone, Default)]
pub struct ContainerDriver {}

impl Lifecycle for ContainerDriver {
    fn validate(&self, _spec: &InstanceSpec) -> Result<(), DriverError> { todo!() }
    async fn create(&self, _spec: &InstanceSpec, _ctx: &OpCtx) -> Result<VolatileChanges, DriverError> { todo!() }
    async fn start(&self, _spec: &InstanceSpec, _ctx: &OpCtx) -> Result<VolatileChanges, DriverError> { todo!() }
    async fn stop(&self, _spec: &InstanceSpec, _force: bool, _ctx: &OpCtx) -> Result<VolatileChanges, DriverError> { todo!() }
    async fn state(&self, _spec: &InstanceSpec) -> Result<RuntimeState, DriverError> { todo!() }
    async fn delete(&self, _spec: &InstanceSpec) -> Result<(), DriverError> { todo!() }
}

impl StateSave for ContainerDriver {
    async fn save_state(&self, _spec: &InstanceSpec, _ctx: &OpCtx) -> Result<VolatileChanges, DriverError> { todo!() }
    async fn restore_state(&self, _spec: &InstanceSpec, _ctx: &OpCtx) -> Result<VolatileChanges, DriverError> { todo!() }
    fn has_saved_state(&self, _spec: &InstanceSpec) -> bool { todo!() }
    async fn discard_state(&self, _spec: &InstanceSpec) -> Result<(), DriverError> { todo!() }
}
