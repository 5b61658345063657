-- Forward every instance Orthanc receives to the node, except the node's own results
-- (they come back from the node's AE title and must stay here, or they would loop).
function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] == 'DICOMNODE' then
      return
   end
   SendToModality(instanceId, 'dicomnode')
end
